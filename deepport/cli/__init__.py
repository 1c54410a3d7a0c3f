"""The ``deepport`` command line: ``info``, ``certify`` and ``report`` (see :mod:`deepport.cli.main`).

Only this package imports ``rich``; ``import deepport`` does not import it.
"""
