"""GRPO's reward functions: built-in ones and the user's own, each fn(prompt, completion, row) -> float, where
prompt and completion are text and row the data row (a dict: its "answer" and any other field).

Built in:
    exact    1.0 when the completion's final answer equals the row's "answer", else 0.0. The final answer is what
             follows the last "####" (the GSM8K convention), else the last \\boxed{...}, else the last number in the
             text; compared as numbers when both read as numbers (so "42", "42.0" and "1,000" / "1000" match), else
             as text with case and surrounding spaces and periods ignored.
    format   1.0 when the completion matches --format-pattern (a regular expression, searched, dot matching
             newlines; default: a final "#### <number>" line), else 0.0.
Anything else names the user's function as `module:function` or `path/to/file.py:function`.
"""
import importlib
import importlib.util
import math
import numbers
import re
from pathlib import Path

from ..errors import ConfigError, DataError

BUILT_IN = ("exact", "format")
DEFAULT_FORMAT = r"####\s*-?[\d,]+(\.\d+)?\s*$"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_answer(text):
    """The completion's final answer (module docstring), or None."""
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text):
    text = text.strip().rstrip(".").replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def same_answer(got, want):
    if got is None:
        return False
    a, b = _as_number(got), _as_number(str(want))
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=0, abs_tol=1e-9)
    norm = lambda s: s.strip().strip(".").strip().lower()
    return norm(got) == norm(str(want))


def exact(prompt, completion, row):
    if "answer" not in row:
        raise DataError("the 'exact' reward needs an 'answer' field in every row")
    return 1.0 if same_answer(final_answer(completion), row["answer"]) else 0.0


def format_reward(pattern):
    rx = re.compile(pattern, re.DOTALL)

    def check(prompt, completion, row):
        return 1.0 if rx.search(completion) else 0.0
    return check


def user_function(spec):
    """`module:function` or `file.py:function` -> the function; ConfigError naming what is missing."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ConfigError(f"reward function {spec!r}: expected one of {', '.join(BUILT_IN)} or module:function "
                          "(or path/to/file.py:function)")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser()
            if not path.is_file():
                raise ConfigError(f"reward function {spec!r}: {path} is not a file")
            loader = importlib.util.spec_from_file_location(f"mesp_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"reward function {spec!r}: could not load {where} ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {where} has no function {name!r}")
    return fn


def reward_functions(specs, format_pattern=DEFAULT_FORMAT):
    """The names of --reward-functions -> [(stat name, function)]."""
    out = []
    for spec in specs:
        if spec == "exact":
            out.append(("exact", exact))
        elif spec == "format":
            try:
                out.append(("format", format_reward(format_pattern)))
            except re.error as e:
                raise ConfigError(f"format_pattern {format_pattern!r} is not a regular expression ({e})") from None
        else:
            fn = user_function(spec)
            out.append((re.sub(r"\W", "_", spec.rpartition(":")[2]), fn))
    names = [n for n, _ in out]
    if not out or len(set(names)) != len(names):
        raise ConfigError(f"reward_functions: expected one or more distinct functions, got {specs}")
    return out


def score(functions, prompt, completion, row, where):
    """[reward of each function]; a function that raises or returns a non-number is a DataError naming it and the
    row."""
    values = []
    for name, fn in functions:
        try:
            v = fn(prompt, completion, row)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        except Exception as e:
            raise DataError(f"{where}: reward function {name!r} raised {type(e).__name__}: {e}") from None
        if not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise DataError(f"{where}: reward function {name!r} returned {v!r}, expected a finite number")
        values.append(float(v))
    return values
