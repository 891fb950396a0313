"""Acceptance checks on the code itself: no long functions in engine/ and dashboard/."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 80
# function -> why it is longer; keep this list short and each reason true
EXCEPTIONS: dict[str, str] = {}


def long_functions(max_lines: int = MAX_LINES) -> dict[str, int]:
    """'path:function' -> its length in lines, for every function longer than max_lines."""
    found = {}
    for folder in ("engine", "dashboard"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > max_lines:
                        found[f"{path.relative_to(ROOT).as_posix()}:{node.name}"] = length
    return found


def test_no_function_is_longer_than_80_lines():
    too_long = {name: n for name, n in long_functions().items() if name not in EXCEPTIONS}
    assert too_long == {}, f"split these (or list them in EXCEPTIONS with a reason): {too_long}"


def test_the_measure_sees_a_long_function():
    assert long_functions(max_lines=5), "every module has functions longer than 5 lines"
