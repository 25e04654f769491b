"""Fail if a reStructuredText file does not render cleanly with docutils.

Usage: python .ci/check_readme.py [README.rst ...]

Every docutils system message of level WARNING (2) or above is printed and
makes the exit status 1; a missing file is an error too.  PyPI's own
restrictions (no raw/include directives, ...) are checked by ``twine check``.
"""

import io
import sys

import docutils.core
import docutils.nodes
import docutils.utils


def check(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except OSError as exc:
        print("%s: cannot read: %s" % (path, exc))
        return 1
    stream = io.StringIO()
    doctree = docutils.core.publish_doctree(
        source,
        source_path=path,
        settings_overrides={
            "report_level": docutils.utils.Reporter.WARNING_LEVEL,
            "halt_level": docutils.utils.Reporter.SEVERE_LEVEL + 1,  # never halt: list all
            "warning_stream": stream,
            "file_insertion_enabled": False,
            "raw_enabled": False,
            "input_encoding": "utf-8",
            # Whether Pygments is installed must not decide the verdict.
            "syntax_highlight": "none",
        },
    )
    walk = getattr(doctree, "findall", None) or doctree.traverse  # findall: docutils 0.18+
    problems = [
        m
        for m in walk(docutils.nodes.system_message)
        if m["level"] >= docutils.utils.Reporter.WARNING_LEVEL
    ]
    text = stream.getvalue().strip()
    if problems or text:
        print(text or "\n".join(m.astext() for m in problems))
        print("%s: %d docutils warning(s) or error(s)" % (path, max(len(problems), 1)))
        return 1
    print("%s: renders cleanly (docutils %s)" % (path, docutils.__version__))
    return 0


def main(argv: "list[str]") -> int:
    paths = argv or ["README.rst"]
    return max(check(p) for p in paths)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
