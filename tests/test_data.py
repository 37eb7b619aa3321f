"""The shared datasets' readers: the WikiText-2 split keeps SAE training and evaluation disjoint."""

from __future__ import annotations

import re

import pytest

from steerplug import data as D


def _have_wikitext() -> bool:
    try:
        return (D.data_dir() / "wikitext2_raw_test" / "wiki.test.raw").is_file()
    except Exception:
        return False


@pytest.mark.skipif(not _have_wikitext(), reason="../shared/data/wikitext2_raw_test is not here")
def test_wikitext_eval_and_train_parts_are_disjoint_whole_articles():
    full, ev, tr = D.wikitext_test(part="all"), D.wikitext_test(part="eval"), D.wikitext_test(part="train")
    assert ev + tr == full
    assert 0.2 < len(ev) / len(full) < 0.35
    assert re.match(r" = [^=].* = \n", tr)  # the training part starts at an article heading
    eval_titles = set(re.findall(r"^ = ([^=].*) = $", ev, re.MULTILINE))
    train_titles = set(re.findall(r"^ = ([^=].*) = $", tr, re.MULTILINE))
    assert eval_titles and train_titles and not eval_titles & train_titles


def test_wikitext_part_is_checked():
    with pytest.raises(ValueError, match="part='test'"):
        D.wikitext_test(part="test")
