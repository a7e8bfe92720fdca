"""The HTML report (kubetrain.evaluate.report) for each kind of task, from hand-made scores: the
extra metrics, the examples (image grid, text, source/reference/prediction), the confusion
matrix of the classes with most errors, and escaping of every text that comes from data."""

from __future__ import annotations

import base64
import io
import re

import pytest

from kubetrain.core.artifacts import Scores
from kubetrain.evaluate import report
from tests.unit.test_evaluate_gate import CLASSES, classification_values, evaluation, seq2seq_values

EVIL = "<script>alert(1)</script>"


def png_uri() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_report() -> str:
    examples = [
        {"true": "cat", "predicted": "dog", "image": png_uri()},
        {"true": EVIL, "predicted": "fox", "image": "javascript:alert(1)"},
    ]
    e = evaluation(
        Scores("accuracy", classification_values(0.95, top5_accuracy=0.99), examples, samples_per_second=900.0),
        Scores("accuracy", classification_values(0.94, top5_accuracy=0.97), [], samples_per_second=1800.0),
        "images", 0.9, CLASSES,
    )  # fmt: skip
    return report.render(e)


def text_report() -> str:
    examples = [{"text": f"a & b {EVIL}", "true": "cat", "predicted": "<b>fox</b>"}]
    e = evaluation(
        Scores("accuracy", classification_values(0.8, macro_f1=0.7), examples),
        Scores("accuracy", classification_values(0.79, macro_f1=0.69)),
        "text_classification", 0.75, CLASSES,
    )  # fmt: skip
    return report.render(e)


def seq2seq_report() -> str:
    examples = [{"source": "Datei öffnen", "reference": "open file", "prediction": EVIL}]
    e = evaluation(
        Scores("bleu", seq2seq_values(0.31, 0.52), examples, samples_per_second=40.0),
        Scores("bleu", seq2seq_values(0.30, 0.50), [], samples_per_second=70.0),
        "seq2seq", 0.25,
    )  # fmt: skip
    return report.render(e)


def test_no_text_from_the_data_reaches_the_page_unescaped():
    for page in (image_report(), text_report(), seq2seq_report()):
        assert "<script>" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_image_report_shows_misclassified_images_in_a_grid_with_both_labels():
    page = image_report()
    grid = page[page.index("<div class='grid'>") :]
    figures = re.findall(r"<figure>(.*?)</figure>", grid)
    assert len(figures) == 2
    assert figures[0].startswith("<img src='data:image/png;base64,")
    assert "true <b>cat</b>" in figures[0] and "predicted <b>dog</b>" in figures[0]
    assert "javascript:" not in page and "(no image)" in figures[1]  # not an image URI: dropped
    assert "top5_accuracy" in page and "Per class (fp32)" in page


def test_text_report_shows_the_misclassified_texts_and_macro_f1():
    page = text_report()
    assert "<th>text</th><th>true</th><th>predicted</th>" in page
    assert "a &amp; b" in page and "&lt;b&gt;fox&lt;/b&gt;" in page
    assert "macro_f1" in page


def test_seq2seq_report_shows_source_reference_prediction_and_the_copy_baseline():
    page = seq2seq_report()
    assert "<th>source</th><th>reference</th><th>prediction</th>" in page
    assert "<td>Datei öffnen</td><td>open file</td>" in page
    assert "test bleu fp32 0.3100, int8 0.3000, bar 0.2500, and above copying the source" in page
    assert "copy_baseline_bleu" in page and "rouge_l" in page
    assert "tokens/s batch 64" in page
    assert "Per class" not in page and "test accuracy" not in page


@pytest.mark.parametrize(
    ("classes", "shown"),
    [(5, [0, 1, 2, 3, 4]), (30, [*range(5), *range(10, 25)])],
    ids=["few-classes-all", "many-classes-most-errors"],
)
def test_confusion_matrix_keeps_the_classes_with_most_errors(classes, shown):
    # Classes 5..9 and 25..29 are always right; 0..4 and 10..24 have errors (as true or as
    # predicted class): with 30 classes the matrix shows those 20.
    matrix = [[10 if i == j else 0 for j in range(classes)] for i in range(classes)]
    for i in [*range(5), *range(10, min(25, classes))]:
        j = (i + 1) % 5 if i < 5 else i
        if i >= 10:
            matrix[i][i] -= 2
            matrix[i][0 if i % 2 else 1] += 2
        else:
            matrix[i][j] += 1
    assert report.top_error_classes(matrix) == shown


def test_many_classes_say_which_are_shown():
    n = 25
    names = [f"c{i}" for i in range(n)]
    matrix = [[5 if i == j else (1 if j == (i + 1) % n and i < 21 else 0) for j in range(n)]
              for i in range(n)]  # fmt: skip
    values = {"accuracy": 0.8, "confusion_matrix": matrix,
              "per_class_accuracy": dict.fromkeys(names, 0.8)}  # fmt: skip
    section = report.per_class_section(Scores("accuracy", values), names)
    assert "25 classes: the matrix shows the 20 with the most errors" in section
