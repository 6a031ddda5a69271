"""Long label CSV -> one row per image, and the errors that name the ids."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from competition.constants import LABELS
from competition.labels import LabelError, labels_to_long, long_to_wide, read_labels


def long_rows(image_id: str, values: list[int]) -> list[tuple[str, int]]:
    return [(f"{image_id}_{label}", v) for label, v in zip(LABELS, values)]


def test_long_to_wide_drops_exact_duplicates_and_orders_labels(tmp_path):
    rows = long_rows("ID_00000000b", [0, 1, 0, 0, 0, 1]) + long_rows("ID_00000000a", [0] * 6)
    rows += rows[:3]  # exact duplicate rows, as the real stage_2_train.csv has
    path = tmp_path / "train.csv"
    pd.DataFrame(rows, columns=["ID", "Label"]).sample(frac=1, random_state=0).to_csv(path, index=False)
    wide = read_labels(path)
    assert list(wide.columns) == ["image_id", *LABELS]
    assert wide["image_id"].tolist() == ["ID_00000000a", "ID_00000000b"]
    assert wide.iloc[1][list(LABELS)].tolist() == [0, 1, 0, 0, 0, 1]
    assert (wide[list(LABELS)].dtypes == np.int8).all()


def test_round_trip_to_long():
    wide = pd.DataFrame({"image_id": ["ID_1", "ID_2"], **{c: [i % 2, 1] for i, c in enumerate(LABELS)}})
    long = labels_to_long(wide)
    assert long["ID"].tolist()[:2] == ["ID_1_epidural", "ID_1_intraparenchymal"]
    assert len(long) == 12
    pd.testing.assert_frame_equal(long_to_wide(long), wide.astype({c: np.int8 for c in LABELS}))


def test_conflicting_duplicates_name_the_id():
    rows = long_rows("ID_00000000a", [0] * 6) + [("ID_00000000a_subdural", 1)]
    with pytest.raises(LabelError, match="conflicting.*ID_00000000a_subdural"):
        long_to_wide(pd.DataFrame(rows, columns=["ID", "Label"]))


def test_missing_subtype_names_the_image():
    rows = long_rows("ID_00000000a", [0] * 6)[:-1] + long_rows("ID_00000000b", [0] * 6)
    with pytest.raises(LabelError, match="missing.*ID_00000000a"):
        long_to_wide(pd.DataFrame(rows, columns=["ID", "Label"]))


@pytest.mark.parametrize("bad", [2, -1, 0.5, "yes"])
def test_non_binary_labels_name_the_id(bad):
    rows = long_rows("ID_00000000a", [0] * 5 + [bad])
    with pytest.raises(LabelError, match="0/1.*ID_00000000a_any"):
        long_to_wide(pd.DataFrame(rows, columns=["ID", "Label"]))


def test_unknown_subtype_and_missing_column(tmp_path):
    rows = long_rows("ID_00000000a", [0] * 6) + [("ID_00000000a_chronic", 0)]
    with pytest.raises(LabelError, match="unknown subtype.*chronic"):
        long_to_wide(pd.DataFrame(rows, columns=["ID", "Label"]))
    with pytest.raises(LabelError, match="missing column.*Label"):
        long_to_wide(pd.DataFrame({"ID": ["ID_1_any"], "Target": [0]}))
    with pytest.raises(LabelError, match="not found"):
        read_labels(tmp_path / "absent.csv")


def test_empty_label_file_is_one_clear_error(tmp_path):
    empty = tmp_path / "stage_2_train.csv"
    empty.write_text("")
    with pytest.raises(LabelError, match=r"stage_2_train.csv is empty .*make data"):
        read_labels(empty)
    empty.write_text("ID,Label\n")
    with pytest.raises(LabelError, match="has a header but no rows"):
        read_labels(empty)
