"""Prose paragraphs from CPython's standard-library docstrings (PSF license)."""
import ast, pathlib, re, sys, sysconfig
lib = pathlib.Path(sysconfig.get_paths()["stdlib"])
skip = ("test", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip", "pydoc_data", "encodings")
paras, seen = [], set()
for path in sorted(lib.rglob("*.py")):
    rel = path.relative_to(lib).parts
    if any(p.startswith(skip) for p in rel):
        continue
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except Exception:
        continue
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                lines = [l.strip() for l in para.splitlines()]
                if any(l.startswith((">>>", "...", "$", "%", "-", "*", "|", "+", ":", "=")) for l in lines):
                    continue
                text = " ".join(lines)
                words = text.split()
                if len(words) < 12 or not text[0].isupper() or not text.endswith("."):
                    continue
                letters = sum(c.isalpha() or c.isspace() for c in text) / len(text)
                if letters < 0.9 or "(" in text and text.count("(") > 3 or "_" in text:
                    continue
                if text in seen:
                    continue
                seen.add(text)
                paras.append(text)
sys.stdout.write("\n".join(paras) + "\n")
