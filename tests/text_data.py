"""Public-domain test text: Jane Austen's novels from Debian's r-cran-janeaustenr package.

The package stores them as R data; the pure-Python `rdata` reads them. `python tests/text_data.py
--fetch` downloads and unpacks the .deb into the cache (apt-get download, no R needed).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

CACHE = Path(os.environ.get("FASTINFER_DATA", Path.home() / ".cache" / "fastinfer")) / "janeaustenr"
DATA = CACHE / "usr/lib/R/site-library/janeaustenr/data"


def fetch() -> Path:
    if (DATA / "Rdata.rdb").exists():
        return DATA
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["apt-get", "download", "r-cran-janeaustenr"]
        if subprocess.run(cmd, cwd=tmp, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        deb = next(Path(tmp).glob("*.deb"))
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg", "-x", str(deb), str(CACHE)], check=True)
    return DATA


def novel(name: str = "prideprejudice") -> str:
    """The novel's text, lines joined with newlines (fetched on first use)."""
    import warnings

    import rdata
    data = fetch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about the .rdx extension
        index = rdata.conversion.convert(rdata.parser.parse_file(data / "Rdata.rdx"))
    offset, length = (int(x) for x in index["variables"][name])
    with open(data / "Rdata.rdb", "rb") as f:
        f.seek(offset)
        blob = f.read(length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))
    return "\n".join(str(line) for line in lines)


if __name__ == "__main__":
    if "--fetch" in sys.argv:
        print(f"janeaustenr data in {fetch()}")
    else:
        print(novel()[:500])
