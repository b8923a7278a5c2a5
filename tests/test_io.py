"""write_csv: long tables through Arrow's writer read back exactly as pandas would have written them."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cleanloop.io import ARROW_CSV_ROWS, write_csv


def _table(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({
        "image_uuid": [f"img-{i:06d}" for i in range(n)],
        "given_label": rng.choice(["post-inflammatory hyperpigmentation (PIH)", "café au lait", "A+B: c/d"], n),
        "label_quality": rng.random(n) ** 8,
        "is_label_issue": rng.random(n) < 0.07,
        "fold": rng.integers(0, 5, n),
    })
    df.loc[3, "label_quality"] = 2.1766071167661494e-09
    df.loc[4, "label_quality"] = np.nan
    return df


def test_a_long_plain_table_round_trips_exactly(tmp_path):
    df = _table(ARROW_CSV_ROWS + 10)
    write_csv(tmp_path / "a.csv", df)
    text = (tmp_path / "a.csv").read_text()
    assert text.splitlines()[0] == "image_uuid,given_label,label_quality,is_label_issue,fold"
    assert '"' not in text and "2.1766071167661494e-9," in text  # Arrow's spelling: the fast path ran
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), df, check_exact=True, check_dtype=False)


def test_cells_that_need_quotes_fall_back_to_pandas(tmp_path):
    df = _table(ARROW_CSV_ROWS + 10)
    df.loc[7, "given_label"] = 'eczema, "atopic"'
    write_csv(tmp_path / "b.csv", df)
    assert '"eczema, ""atopic"""' in (tmp_path / "b.csv").read_text()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "b.csv"), df, check_exact=True, check_dtype=False)


def test_short_tables_are_written_by_pandas(tmp_path):
    df = _table(20)
    write_csv(tmp_path / "c.csv", df)
    assert (tmp_path / "c.csv").read_text() == df.to_csv(index=False)
