"""The leaderboard says what its CIs resampled, and warns when a clustered bootstrap had few groups."""

from bench.report.leaderboard import FEW_GROUPS, _units


def _row(unit, groups, state="done"):
    return {"state": state, "cell": {"bootstrap_unit": unit, "bootstrap_groups": groups}}


def test_units_name_the_resampled_unit_and_warn_on_few_groups():
    assert _units([_row("images", 8)]) == "images"
    many = _units([_row("sample_id/well", FEW_GROUPS)])
    assert many == "sample_id/well"
    few = _units([_row("sample_id/well", 3), _row("sample_id/well", 12), _row("images", 1, state="failed")])
    assert few.startswith("sample_id/well; with 3 groups (under 10)") and "coarse" in few
