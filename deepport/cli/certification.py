"""``deepport certify --certify``: a certification run and its archive (:mod:`deepport.conformance.certificate`).

Prints the header (suite, its source digest, nonce and run seed, device, backends), shows progress,
then the op x backend table, each backend's profiles (claimed or not, verdict), the archive's path
and sha256, and the verdict ``deepport verify`` gives the archive here (without replay). The usual
``results.json``, ``junit.xml`` and ``summary.md`` are written next to the archive too.
Exit status 0 when the archive verifies (VALID CERTIFICATE, or VALID TEST ARCHIVE in test mode).
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from deepport.cli.certify import Plan, print_table, progress_callbacks
from deepport.cli.verify import render_certificate
from deepport.conformance import certificate, report
from deepport.conformance.certificate_verify import verify_certificate
from deepport.conformance.identity import suite_source_sha256
from deepport.conformance.runner import SUITE_VERSION
from deepport.dispatch import device_info


def certify_archive(p: Plan, out: Console) -> int:
    assert p.nonce is not None, "plan() chooses the nonce in certification mode"
    sha, nfiles = suite_source_sha256()
    mode = certificate.certification_mode(p.tier, p.ops, p.case_pattern)
    out.print(Text(f"deepport certify --certify: suite {SUITE_VERSION} (source sha256 {sha[:16]}..., {nfiles} files), "
                   f"tier {p.tier}, {len(p.cases)} case(s) x {len(p.backends)} backend(s)", style="bold"),
              soft_wrap=True)
    if mode == certificate.TEST:
        out.print(Text(f"  TEST MODE ({certificate.TEST_TIER_ENV}={certificate.test_tier()}): this archive will "
                       "not verify as a certificate", style="bold yellow"))
    out.print(Text(f"  device:    {device_info(p.device).describe()}"))
    out.print(Text(f"  nonce:     {p.nonce}  (run seed {p.seed})"))
    out.print(Text(f"  backends:  {', '.join(p.backends)}"))
    out.print(Text(f"  isolation: each backend in its own process, {p.timeout_s:g} s per call (crash and timeout "
                   "are recorded, the run goes on)"))
    with progress_callbacks(p) as (on_start, on_result):
        path, run, _manifest = certificate.certify(
            p.backends, p.out_dir, device=p.device, nonce=p.nonce, tier=p.tier, ops=p.ops,
            case_pattern=p.case_pattern, plugins=p.plugins, timeout_s=p.timeout_s, command=p.command(),
            on_start=on_start, on_result=on_result)
    results = run.to_dict()
    out.print()
    print_table(results, out)
    paths = report.write_reports(run, p.out_dir)
    out.print(Text(f"reports: {', '.join(str(x) for x in paths.values())}"), soft_wrap=True)
    out.print(Text.assemble("certificate archive: ", (str(path), "bold")), soft_wrap=True)
    rep = verify_certificate(path)
    out.print(Text(f"verifying it here (deepport verify {path}):"), soft_wrap=True)
    render_certificate(rep, out)
    return rep.exit_code
