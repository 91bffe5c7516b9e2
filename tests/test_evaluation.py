"""R1's evaluation numbers on hand-built cases: pass@1 (mean correctness of k samples) and
cons@k (correctness of the majority answer)."""

import numpy as np
import pytest

from r1jax.evaluation import pass_and_consensus


def test_pass_at_1_and_cons_at_k_on_known_answers():
    # 3 questions x k = 4 samples; the correct answer is "4", "7", "1".
    extracted = [["4", "5", "4", None],   # majority "4" (right), 2 of 4 right
                 ["7", "8", "8", "9"],    # majority "8" (wrong), 1 of 4 right
                 [None, "", None, None]]  # nothing extracted: cons 0, pass 0
    truth = ["4", "7", "1"]
    correct = np.array([[float(e == t) for e in row] for row, t in zip(extracted, truth)])
    pass1, cons = pass_and_consensus(correct, extracted)
    np.testing.assert_allclose(pass1, [0.5, 0.25, 0.0])
    np.testing.assert_allclose(cons, [1.0, 0.0, 0.0])


def test_ties_go_to_the_answer_seen_first_and_whitespace_is_ignored():
    extracted = [[" 3", "2", "3 ", "2"],  # "3" and "2" tie: "3" came first (and is right)
                 ["2", "3", "3", "2"]]    # "2" first: wrong
    correct = np.array([[1, 0, 1, 0], [0, 1, 1, 0]], np.float32)
    pass1, cons = pass_and_consensus(correct, extracted)
    np.testing.assert_allclose(pass1, [0.5, 0.5])
    np.testing.assert_allclose(cons, [1.0, 0.0])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[P, k\]"):
        pass_and_consensus(np.zeros((2, 3)), [["a"] * 3])
