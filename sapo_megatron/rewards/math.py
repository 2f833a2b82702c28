"""Verifiable reward for math answers (DAPO-Math-17k, AIME): extract, normalise, compare.

DAPO-Math prompts end with "The last line of your response should be of the form Answer: $Answer", and
models trained on MATH-style data answer with ``\\boxed{...}``; both forms are read, and the one that
comes last in the response is the model's final answer.

Comparison runs in three stages, cheapest first:

1. the normalised strings are equal (``\\boxed{ 1,000 }`` and ``1000``);
2. both sides evaluate to numbers (integers, decimals, ``\\frac``, ``a/b``, mixed numbers, ``\\sqrt``,
   ``\\pi``, powers) and the numbers are equal: exactly for rationals, to 1e-9 relative otherwise. This
   stage is decisive: two numbers that differ are a wrong answer, even where the symbolic stage would
   round them together (``0.333333`` is not ``\\frac{1}{3}``);
3. otherwise, symbolic equality through ``math-verify`` (sympy underneath) when that package is
   installed: expressions, intervals, sets, tuples. Its time bound is a SIGALRM timer, which Python only
   allows on the main thread; called from another thread, the stage runs unbounded, so run rewards
   through :class:`sapo_megatron.rewards.sandbox.RewardSandbox` (whose workers call it on their main
   thread, and which kills a worker that hangs anyway).
"""

from __future__ import annotations

import math
import re
import threading
from fractions import Fraction

# Unit words stripped from the end of a numeric answer ("12 cm", "5 \text{ meters}").
_UNITS = (
    "units", "unit", "sq units", "square units", "cm", "mm", "km", "m", "meters", "meter", "inches", "inch",
    "feet", "foot", "ft", "yards", "yard", "miles", "mile", "seconds", "second", "sec", "s", "minutes",
    "minute", "min", "hours", "hour", "hr", "days", "day", "weeks", "week", "years", "year", "degrees",
    "degree", "radians", "dollars", "dollar", "cents", "cent", "pounds", "pound", "kg", "g", "grams", "gram",
    "liters", "liter", "mph", "people", "students", "ways", "points", "percent",
)  # fmt: skip
_UNIT_SUFFIX = re.compile(
    r"(?<=[\d})])\s*(?:" + "|".join(sorted((re.escape(u) for u in _UNITS), key=len, reverse=True)) + r")"
    r"\s*(?:\^\{?[23]\}?|²|³)?\s*$"
)
# Commands whose argument is plain text: the wrapper goes, the text stays.
_TEXT_COMMANDS = ("text", "textbf", "textit", "textrm", "mathrm", "mathbf", "mathit", "mbox", "operatorname")
_SPACING = re.compile(r"\\[!,;:> ]|\\q?quad\b|~")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|\\circ\b|\\degree\b|°")
_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(?:,\d{3})+(?:\.\d+)?")
# "x = 5", "k=12": a single symbol on the left means the right-hand side is the answer.
_SINGLE_SYMBOL_LHS = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(?=\S)")
_ANSWER_LINE = re.compile(r"\banswer\s*(?:\*\*|__)?\s*[:：]", re.IGNORECASE)
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox)\b")
# $...$ (not the escaped dollar sign \$), \(...\), \[...\].
_INLINE_MATH = re.compile(r"(?<!\\)\$\$?(.+?)(?<!\\)\$\$?|\\\((.+?)\\\)|\\\[(.+?)\\\]", re.DOTALL)

# Answers longer than this are not handed to sympy: real final answers are short, and parsing a long
# string can take seconds.
_MAX_SYMBOLIC_CHARS = 300
# Bounds of the numeric evaluator: it refuses (and leaves the case to the symbolic stage) rather than
# compute 9^{9^{9^9}} or overflow a float.
_MAX_EXPONENT = 1000
_MAX_MAGNITUDE = 1e300
_REL_TOL = 1e-9


def math_reward(
    response: str,
    ground_truth: str,
    *,
    missing_answer_reward: float = 0.0,
    symbolic: bool = True,
    symbolic_timeout_s: int = 2,
) -> float:
    """1.0 if the response's final answer equals ``ground_truth``, else 0.0.

    ``missing_answer_reward`` is returned when no final answer can be found (no ``\\boxed{}`` and no
    "Answer:" line, or a response cut off inside ``<think>``); set it below 0 to penalise the format
    separately from a wrong answer. ``symbolic_timeout_s`` bounds each sympy parse / comparison (whole
    seconds: the bound is a SIGALRM timer).
    """
    predicted = extract_answer(response)
    if predicted is None:
        return float(missing_answer_reward)
    matched = answers_match(predicted, ground_truth, symbolic=symbolic, symbolic_timeout_s=symbolic_timeout_s)
    return 1.0 if matched else 0.0


def extract_answer(response: str) -> str | None:
    """The final answer in a model response, unnormalised, or None when there is none.

    Candidates are the argument of every ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces included) and
    the text after every "Answer:" (markdown bold allowed; if the line is empty, the next non-empty
    line). The candidate that starts last wins. Reasoning inside ``<think>...</think>`` is ignored; a
    response still inside an unclosed ``<think>`` has no answer.
    """
    if "</think>" in response:
        response = response.rsplit("</think>", 1)[1]
    elif "<think>" in response:
        return None
    best: tuple[int, str] | None = None
    for candidate in (_last_boxed(response), _last_answer_line(response)):
        if candidate is not None and (best is None or candidate[0] > best[0]):
            best = candidate
    return None if best is None else best[1]


def normalize_answer(answer: str) -> str:
    """A canonical string for comparison: what two correct spellings of the same answer have in common.

    Removes math delimiters, ``\\boxed``, ``\\left``/``\\right``, spacing commands, ``\\text{}``-style
    wrappers, units, degree / percent / dollar signs, thousands separators, trailing periods and all
    spaces; rewrites ``\\dfrac``/``\\tfrac`` to ``\\frac``, ``\\frac12`` to ``\\frac{1}{2}``, ``\\sqrt2`` to
    ``\\sqrt{2}``, ``.5`` to ``0.5``, and ``x = 5`` to ``5``.
    """
    s = answer.strip().rstrip(".").strip()
    s = _strip_delimiters(s)
    s = _unwrap_whole_box(s)
    s = s.replace("\\displaystyle", "")
    # \left( -> (, \right\} -> \}, and the invisible delimiters \left. / \right. disappear.
    s = re.sub(r"\\(?:left|right|big|Big|bigg|Bigg)(?:\.|(?![a-zA-Z]))", "", s)
    s = _SPACING.sub(" ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("{,}", ",")
    s = _unwrap_text_commands(s)
    s = _DEGREES.sub("", s)
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    s = s.strip().rstrip(".").strip()
    s = _strip_unit(s)
    if s.count("=") == 1:
        s = _SINGLE_SYMBOL_LHS.sub("", s)
    # Checked before spaces go: "1, 234" is a list of two numbers, "1,234" one number.
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    # Shorthand arguments: \frac12, \frac1{2}, \frac{1}2, \sqrt2, \sqrt[3]2.
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*(?=\{)", r"\\frac{\1}", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*(\d)", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*(\[[^\]]*\])?\s*(\d|[a-zA-Z](?![a-zA-Z]))", r"\\sqrt\1{\2}", s)
    s = _remove_spaces(s)
    s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)
    return s.rstrip(".")


def answers_match(predicted: str, ground_truth: str, *, symbolic: bool = True, symbolic_timeout_s: int = 2) -> bool:
    """Whether two answers are equal: normalised strings, then numbers, then sympy (see the module doc)."""
    pred, gold = normalize_answer(predicted), normalize_answer(ground_truth)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    pred_value, gold_value = numeric_value(pred), numeric_value(gold)
    if pred_value is not None and gold_value is not None:
        return _numbers_equal(pred_value, gold_value)
    if not symbolic or max(len(pred), len(gold)) > _MAX_SYMBOLIC_CHARS:
        return False
    # A comma left after normalisation separates items (thousands separators are gone): a list is never
    # a single number, though sympy would read "1,234" as 1234.
    if (pred_value is not None and "," in gold) or (gold_value is not None and "," in pred):
        return False
    return _symbolic_equal(pred, gold, timeout_s=symbolic_timeout_s)


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------


def _last_boxed(text: str) -> tuple[int, str] | None:
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        rest = match.end()
        while rest < len(text) and text[rest] == " ":
            rest += 1
        if rest < len(text) and text[rest] == "{":
            close = _matching_brace(text, rest)
            if close is None:  # cut off mid-answer: try the previous box
                continue
            content = text[rest + 1 : close]
        else:
            # "\boxed 5": the argument is the next token.
            token = re.match(r"[^\s$]+", text[rest:])
            if token is None or rest == match.end():
                continue
            content = token.group(0)
        if content.strip():
            return match.start(), content.strip()
    return None


def _last_answer_line(text: str) -> tuple[int, str] | None:
    for match in reversed(list(_ANSWER_LINE.finditer(text))):
        line_end = text.find("\n", match.end())
        content = text[match.end() : len(text) if line_end < 0 else line_end]
        content = _clean_answer_line(content)
        if not content and line_end >= 0:
            # "**Answer:**" on its own line, the answer on the next non-empty one.
            following = [line for line in text[line_end + 1 :].split("\n") if line.strip()]
            content = _clean_answer_line(following[0]) if following else ""
        if content:
            return match.start(), content
    return None


def _clean_answer_line(line: str) -> str:
    line = line.strip().strip("*_").strip()
    # "Answer: the area is $204$." -> the last inline formula is the answer.
    formulas = [next(g for g in m.groups() if g is not None) for m in _INLINE_MATH.finditer(line)]
    if formulas:
        return formulas[-1].strip()
    return line.rstrip(".").strip()


def _matching_brace(text: str, open_index: int) -> int | None:
    depth = 0
    i = open_index
    while i < len(text):
        char = text[i]
        if char == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


# ----------------------------------------------------------------------------------------------------------
# Normalisation helpers
# ----------------------------------------------------------------------------------------------------------


def _strip_delimiters(s: str) -> str:
    changed = True
    while changed and s:
        changed = False
        for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left) : len(s) - len(right)].strip()
                changed = True
                break
    return s


def _unwrap_whole_box(s: str) -> str:
    match = _BOX_COMMAND.match(s)
    if match:
        start = s.find("{", match.end())
        if start >= 0 and not s[match.end() : start].strip():
            close = _matching_brace(s, start)
            if close == len(s) - 1:
                return s[start + 1 : close].strip()
    return s


def _unwrap_text_commands(s: str) -> str:
    pattern = re.compile(r"\\(?:" + "|".join(_TEXT_COMMANDS) + r")\s*\{")
    while True:
        match = pattern.search(s)
        if match is None:
            return s
        close = _matching_brace(s, match.end() - 1)
        if close is None:
            return s[: match.start()] + s[match.end() :]
        s = s[: match.start()] + " " + s[match.end() : close] + " " + s[close + 1 :]


def _strip_unit(s: str) -> str:
    # Only after a purely numeric quantity: in "x^2+5m" the m is a variable, in "12 m" a unit.
    match = _UNIT_SUFFIX.search(s)
    if match is None:
        return s
    quantity = s[: match.start()]
    if re.search(r"[a-zA-Z]", re.sub(r"\\(?:frac|sqrt|pi)", "", quantity)):
        return s
    return quantity.strip()


def _remove_spaces(s: str) -> str:
    # A space that ends a control word before a letter is meaningful ("\pi r" is not "\pir"): keep one.
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", lambda m: m.group(1) + "\x00", s)
    s = re.sub(r"\s+", "", s)
    return s.replace("\x00", " ")


# ----------------------------------------------------------------------------------------------------------
# Numeric stage: a small recursive-descent evaluator over normalised LaTeX (no eval, bounded work)
# ----------------------------------------------------------------------------------------------------------

Number = Fraction | float


class _NotNumeric(Exception):
    pass


_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+|\\[a-zA-Z]+|[-+*/^(){}\[\]]")


def numeric_value(normalized: str) -> Number | None:
    """The value of a normalised answer made only of numbers, or None (variables, sets, text, ...).

    Rationals stay exact (``Fraction``); square roots of non-squares and ``\\pi`` make a float. A digit
    string directly followed by a fraction is a mixed number (``2\\frac{1}{2}`` = 5/2), as in MATH answers.
    """
    mixed = re.fullmatch(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", normalized)
    if mixed and int(mixed.group(4)) != 0:
        value = int(mixed.group(2)) + Fraction(int(mixed.group(3)), int(mixed.group(4)))
        return -value if mixed.group(1) else value
    compact = normalized.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    tokens = _TOKEN.findall(compact)
    if "".join(tokens) != compact:  # some character the evaluator does not know (a letter, a comma)
        return None
    try:
        parser = _Evaluator(tokens)
        value = parser.expression()
        if parser.position != len(tokens):
            return None
        return _checked(value)
    except (_NotNumeric, ZeroDivisionError, OverflowError, ValueError):
        return None


class _Evaluator:
    def __init__(self, tokens: list[str]):
        self.tokens, self.position = tokens, 0

    def _peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            raise _NotNumeric
        self.position += 1
        return token

    def expression(self) -> Number:
        value = self.term()
        while self._peek() in ("+", "-"):
            value = value + self.term() if self._take() == "+" else value - self.term()
        return _checked(value)

    def term(self) -> Number:
        value = self.unary()
        while True:
            token = self._peek()
            if token in ("*", "/"):
                self._take()
                right = self.unary()
                value = value * right if token == "*" else _divide(value, right)
            elif token is not None and _starts_atom(token):  # implicit product: 2\sqrt{3}, 3\pi
                value = value * self.power()
            else:
                return _checked(value)

    def unary(self) -> Number:
        if self._peek() in ("+", "-"):
            sign = self._take()
            value = self.unary()
            return -value if sign == "-" else value
        return self.power()

    def power(self) -> Number:
        base = self.atom()
        if self._peek() != "^":
            return base
        self._take()
        exponent = self.unary()  # right-associative: 2^3^2 = 2^(3^2)
        return _power(base, exponent)

    def atom(self) -> Number:
        token = self._take()
        if token[0].isdigit() or token[0] == ".":
            return Fraction(token)
        if token in ("(", "{"):
            value = self.expression()
            self._take(")" if token == "(" else "}")
            return value
        if token == "\\frac":
            numerator = self._group()
            return _divide(numerator, self._group())
        if token == "\\sqrt":
            index: Number = Fraction(2)
            if self._peek() == "[":
                self._take()
                index = self.expression()
                self._take("]")
            return _root(self._group(), index)
        if token == "\\pi":
            return math.pi
        raise _NotNumeric

    def _group(self) -> Number:
        # \frac{1}{2}; a bare digit (\frac12) was already braced by the normaliser.
        self._take("{")
        value = self.expression()
        self._take("}")
        return value


def _starts_atom(token: str) -> bool:
    return token[0].isdigit() or token in ("(", "{", "\\frac", "\\sqrt", "\\pi")


def _checked(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise _NotNumeric
    if abs(value) > _MAX_MAGNITUDE:
        raise _NotNumeric
    return value


def _divide(a: Number, b: Number) -> Number:
    if b == 0:
        raise _NotNumeric
    return a / b


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(exponent, Fraction) and exponent.denominator == 1:
        if abs(exponent) > _MAX_EXPONENT:
            raise _NotNumeric
        if base == 0 and exponent < 0:
            raise _NotNumeric
        if isinstance(base, Fraction):
            # Bound the size of the exact result before computing it.
            digits = max(len(str(base.numerator)), len(str(base.denominator)))
            if digits * abs(exponent) > 2000:
                raise _NotNumeric
        return _checked(base**exponent)
    if base < 0:
        raise _NotNumeric
    return _checked(float(base) ** float(exponent))


def _root(value: Number, index: Number) -> Number:
    if not (isinstance(index, Fraction) and index.denominator == 1 and index >= 2):
        raise _NotNumeric
    n = int(index)
    if value < 0:
        raise _NotNumeric
    if isinstance(value, Fraction):
        num, den = _exact_root(value.numerator, n), _exact_root(value.denominator, n)
        if num is not None and den is not None:
            return Fraction(num, den)
    return float(value) ** (1.0 / n)


def _exact_root(value: int, n: int) -> int | None:
    if value.bit_length() > 4000:
        raise _NotNumeric
    guess = round(value ** (1.0 / n)) if value < 2**1000 else None
    if guess is None:
        return None
    for candidate in (guess - 1, guess, guess + 1):
        if candidate >= 0 and candidate**n == value:
            return candidate
    return None


def _numbers_equal(a: Number, b: Number) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b
    return math.isclose(float(a), float(b), rel_tol=_REL_TOL, abs_tol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# Symbolic stage
# ----------------------------------------------------------------------------------------------------------


def _symbolic_equal(pred: str, gold: str, *, timeout_s: int) -> bool:
    try:
        import math_verify
        from latex2sympy2_extended import NormalizationConfig
    except ImportError:
        return False
    # SIGALRM (math-verify's timer) can only be armed from the main thread; elsewhere run unbounded and
    # rely on the caller's containment (RewardSandbox).
    bound = max(1, int(timeout_s)) if threading.current_thread() is threading.main_thread() else None
    # Units were already stripped where they are units; math-verify's own unit list would also eat
    # variables ("5m" -> "5").
    latex = math_verify.LatexExtractionConfig(
        normalization_config=NormalizationConfig(
            basic_latex=True, units=False, malformed_operators=True, nits=True, boxed="all", equations=False
        )
    )
    targets = [latex, math_verify.ExprExtractionConfig()]
    gold_parsed = math_verify.parse(f"${gold}$", extraction_config=targets, parsing_timeout=bound)
    pred_parsed = math_verify.parse(f"${pred}$", extraction_config=targets, parsing_timeout=bound)
    if not gold_parsed or not pred_parsed:
        return False
    # float_rounding=10: rounding to math-verify's default 6 places would accept 0.333333 for 1/3 or
    # 2.718281 for e; exact forms were already compared by the numeric stage.
    return bool(math_verify.verify(gold_parsed, pred_parsed, float_rounding=10, timeout_seconds=bound))
