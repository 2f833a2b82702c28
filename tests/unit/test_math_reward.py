"""Math reward: answer extraction from real-looking responses, normalisation, and the three comparison
stages (string, number, symbolic), including near misses that must score 0."""

from __future__ import annotations

import time

import pytest

from sapo_megatron.rewards.math import answers_match, extract_answer, math_reward, normalize_answer

DAPO_STYLE = """We need $AB + AC$. Using the angle bisector theorem and $\\sin A = \\frac45$, we get
$AB + AC = \\frac{11\\sqrt{5}}{18}$, so $a + b + c = 11 + 5 + 18 = 34$.

Answer: 34"""


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        (DAPO_STYLE, "34"),
        ("The ratio is $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),
        ("First guess \\boxed{3}. Checking again, the count is \\boxed{5}.", "5"),
        ("**Answer:** $17$", "17"),
        ("**Answer:**\n\n$17$\n", "17"),
        ("Final Answer: The final answer is $36\\pi$. I hope it is correct.", "36\\pi"),
        ("Answer: $\\boxed{1,000}$", "1,000"),
        ("So the answer is \\boxed{12}.\n\nAnswer: 13", "13"),  # the later one is final
        ("hence \\fbox{42}", "42"),
        ("hence $\\boxed 7$", "7"),
        ("So $\\boxed{3}$. Then the area is $\\boxed{\\frac{1}{2", "3"),  # cut off mid-answer
        ("<think>maybe \\boxed{4}?</think>The probability is \\boxed{\\dfrac{1}{6}}.", "\\dfrac{1}{6}"),
        ("<think>Let me try \\boxed{4} and check", None),  # still thinking when cut off
        ("The answer is 204.", None),
        ("", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("\\boxed{ 1,000 }", "1000"),
        ("$\\dfrac{1}{2}$", "\\frac{1}{2}"),
        ("\\tfrac12", "\\frac{1}{2}"),
        ("\\sqrt2/2", "\\sqrt{2}/2"),
        ("12\\text{ cm}^2", "12"),
        ("10 \\mbox{ units}", "10"),
        ("90^\\circ", "90"),
        ("90^{\\circ}", "90"),
        ("50\\%", "50"),
        ("\\$1,234.50", "1234.50"),
        ("1{,}000", "1000"),
        ("1\\,000", "1000"),
        ("\\left( 1, 2 \\right)", "(1,2)"),
        ("x = 5", "5"),
        (".5", "0.5"),
        ("5.", "5"),
        ("2\\pi r", "2\\pi r"),  # the space that separates \pi from r survives
        ("x^2+5m", "x^2+5m"),  # m is a variable here, not metres
        ("1, 234", "1,234"),  # two numbers, not one thousands-separated number
        ("(5,100)", "(5,100)"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("response", "ground_truth"),
    [
        ("Thus the probability is $\\boxed{\\frac{1}{2}}$.", "0.5"),
        ("The total is \\boxed{ 1,000 }", "1000"),
        ("Answer: 204", "204"),
        ("So the height is \\boxed{\\sqrt{2}/2}.", "\\frac{\\sqrt2}{2}"),
        ("\\boxed{3\\sqrt{2}}", "\\sqrt{18}"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac34"),
        ("\\boxed{90^\\circ}", "90"),
        ("\\boxed{12\\text{ cm}}", "12"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{2\\frac{1}{2}}", "\\frac{5}{2}"),
        ("\\boxed{0.50}", "\\frac{1}{2}"),
        ("\\boxed{2^{10}}", "1024"),
        ("\\boxed{\\sqrt[3]{27}}", "3"),
        ("\\boxed{-\\frac{3}{4}}", "-0.75"),
        ("\\boxed{\\left(1, 2\\right)}", "(1,2)"),
        ("Answer: $\\$1,234.50$", "1234.5"),
        ("\\boxed{\\frac{\\pi}{2}}", "\\pi/2"),
        ("<think>It could be 7 or 8.</think>\n\nAnswer: 8", "8"),
    ],
)
def test_equal_answers_score_one(response, ground_truth):
    assert math_reward(response, ground_truth, symbolic=False) == 1.0


@pytest.mark.parametrize(
    ("response", "ground_truth"),
    [
        ("\\boxed{205}", "204"),
        ("\\boxed{-204}", "204"),
        ("\\boxed{1,000}", "100"),
        ("\\boxed{0.333333}", "\\frac{1}{3}"),  # an approximation is not the exact answer
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt2}{2}"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{3}"),
        ("\\boxed{1, 234}", "1234"),
        ("First \\boxed{204}, but after checking: \\boxed{210}", "204"),  # only the last answer counts
        ("The answer is 204.", "204"),  # no final-answer marker at all
        ("<think>so it is \\boxed{204}", "204"),  # cut off before finishing
        ("\\boxed{2\\pi}", "2\\pi r"),
    ],
)
def test_wrong_or_missing_answers_score_zero(response, ground_truth):
    assert math_reward(response, ground_truth) == 0.0


def test_missing_answer_can_be_penalised_apart_from_a_wrong_one():
    assert math_reward("I could not solve it.", "204", missing_answer_reward=-1.0) == -1.0
    assert math_reward("Answer: 203", "204", missing_answer_reward=-1.0) == 0.0
    assert math_reward("Answer: 204", "204", missing_answer_reward=-1.0) == 1.0


def test_symbolic_stage():
    pytest.importorskip("math_verify")
    assert answers_match("(x+1)^2", "x^2+2x+1")
    assert not answers_match("(x+1)^2", "x^2+2x+1", symbolic=False)
    assert answers_match("\\binom{5}{2}", "10")
    assert answers_match("3\\pi r^2", "3r^2\\pi")
    assert answers_match("\\{1,2\\}", "\\{2,1\\}")
    assert not answers_match("x+1", "x+2")
    assert not answers_match("(2,5]", "[2,5)")
    assert not answers_match("(1,2)", "(2,1)")
    assert not answers_match("x^2+5m", "x^2+5")  # m is a variable; math-verify's unit stripping is off
    assert not answers_match("e", "2.718281828")  # rounding to 6 places would accept this


def test_symbolic_stage_is_time_bounded():
    pytest.importorskip("math_verify")
    started = time.monotonic()
    # Too large for the numeric stage, so sympy gets it; the bound turns a very long computation into a 0.
    assert math_reward("\\boxed{9^{9^{9^9}}}", "1", symbolic_timeout_s=1) == 0.0
    assert time.monotonic() - started < 10
