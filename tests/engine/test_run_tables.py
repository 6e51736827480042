import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simfl.engine.run_tables import SCHEMAS, PartWriter, RunTables
from simfl.privacy.defences import DEFENCES

SCHEMA = pa.schema([("round", pa.int32()), ("name", pa.string()), ("value", pa.float64())])


def rows(start, n):
    return [{"round": i, "name": f"c{i}", "value": i / 4} for i in range(start, start + n)]


def sample_value(field: pa.Field, i: int = 0):
    t = field.type
    if pa.types.is_boolean(t):
        return i % 2 == 0
    if pa.types.is_int32(t):
        return 7 + i
    if pa.types.is_int64(t):
        return 2**40 + i  # beyond int32
    if pa.types.is_floating(t):
        return 0.25 + i
    if pa.types.is_string(t):
        return f"text-{field.name}-{i}"
    raise AssertionError(f"no sample for {t}")


def read_dir(path):
    return pd.read_parquet(path).sort_values("round").reset_index(drop=True)


# ---------------------------------------------------------------- PartWriter


def test_parts_readable_by_pandas_with_schema(tmp_path):
    w = PartWriter(tmp_path / "t", SCHEMA)
    w.append(rows(0, 3))
    w.flush()
    w.append(rows(3, 2))
    w.append(rows(5, 1))
    w.flush()
    assert w.parts() == ["part-000000.parquet", "part-000001.parquet"]
    df = read_dir(tmp_path / "t")
    assert df["round"].tolist() == list(range(6))
    assert df["name"].tolist() == [f"c{i}" for i in range(6)]
    assert df["value"].tolist() == [i / 4 for i in range(6)]
    assert str(df["round"].dtype) == "int32"
    for name in w.parts():
        assert pq.read_schema(tmp_path / "t" / name).remove_metadata() == SCHEMA
    assert pq.read_table(tmp_path / "t").schema.remove_metadata() == SCHEMA


def test_flush_without_rows_writes_nothing(tmp_path):
    w = PartWriter(tmp_path / "t", SCHEMA)
    w.flush()
    assert not (tmp_path / "t").exists()  # no rows, no table directory
    w.append([])
    w.flush()
    assert w.parts() == [] and w.next_part == 0
    w.append(rows(0, 1))
    w.flush()
    w.flush()  # buffer emptied by the first flush
    assert w.parts() == ["part-000000.parquet"]


def test_rows_buffered_until_flush(tmp_path):
    w = PartWriter(tmp_path / "t", SCHEMA)
    w.append(rows(0, 4))
    assert w.parts() == []
    w.flush()
    assert w.rows == []
    assert pq.read_table(tmp_path / "t" / "part-000000.parquet").num_rows == 4


def test_bad_row_type_raises_and_leaves_no_part(tmp_path):
    w = PartWriter(tmp_path / "t", SCHEMA)
    w.append([{"round": "not a number", "name": "x", "value": 1.0}])
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        w.flush()
    assert w.parts() == []


def test_no_temporary_files_left(tmp_path):
    w = PartWriter(tmp_path / "t", SCHEMA)
    for i in range(3):
        w.append(rows(i, 1))
        w.flush()
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == w.parts()


def test_leftover_tmp_from_crash_is_ignored_by_readers(tmp_path):
    d = tmp_path / "t"
    w = PartWriter(d, SCHEMA)
    w.append(rows(0, 2))
    w.flush()
    # a crash mid-write leaves a truncated hidden temporary file
    good = (d / "part-000000.parquet").read_bytes()
    (d / ".part-000001.parquet.tmp").write_bytes(good[: len(good) // 2])
    df = read_dir(d)
    assert df["round"].tolist() == [0, 1]
    # and a fresh writer on the same directory (a resume) does not count it as a part
    w2 = PartWriter(d, SCHEMA)
    assert w2.next_part == 1
    w2.append(rows(2, 1))
    w2.flush()
    assert read_dir(d)["round"].tolist() == [0, 1, 2]


def test_truncate_to_removes_later_parts_and_renumbers(tmp_path):
    d = tmp_path / "t"
    w = PartWriter(d, SCHEMA)
    for i in range(4):
        w.append(rows(10 * i, 2))
        w.flush()
    keep = w.parts()[:2]
    (d / ".part-000004.parquet.tmp").write_bytes(b"garbage")
    w.truncate_to(keep)
    assert w.parts() == keep
    assert w.next_part == 2
    assert not list(d.glob(".part-*.tmp"))
    assert read_dir(d)["round"].tolist() == [0, 1, 10, 11]
    w.append(rows(20, 1))
    w.flush()
    assert w.parts() == ["part-000000.parquet", "part-000001.parquet", "part-000002.parquet"]
    assert read_dir(d)["round"].tolist() == [0, 1, 10, 11, 20]


def test_truncate_to_empty(tmp_path):
    w = PartWriter(tmp_path / "t", SCHEMA)
    w.append(rows(0, 1))
    w.flush()
    w.truncate_to([])
    assert w.parts() == [] and w.next_part == 0
    w.append(rows(5, 1))
    w.flush()
    assert w.parts() == ["part-000000.parquet"]


def test_writer_resumes_numbering(tmp_path):
    d = tmp_path / "t"
    w = PartWriter(d, SCHEMA)
    for i in range(2):
        w.append(rows(i, 1))
        w.flush()
    w2 = PartWriter(d, SCHEMA)
    assert w2.next_part == 2
    w2.append(rows(2, 1))
    w2.flush()
    assert w2.parts()[-1] == "part-000002.parquet"
    assert read_dir(d)["round"].tolist() == [0, 1, 2]


# ---------------------------------------------------------------- RunTables


def test_run_tables_create_a_dir_per_table_with_rows(tmp_path):
    t = RunTables(tmp_path, flush_seconds=10)
    t.flush()
    assert list(tmp_path.iterdir()) == []
    t.append("rounds", [{f.name: sample_value(f) for f in SCHEMAS["rounds"]}])
    t.flush()
    assert [p.name for p in tmp_path.iterdir()] == ["rounds"]


def test_maybe_flush_respects_flush_seconds(tmp_path):
    row = {f.name: sample_value(f) for f in SCHEMAS["rounds"]}
    slow = RunTables(tmp_path / "slow", flush_seconds=1e9)
    slow.append("rounds", [row])
    slow.maybe_flush()
    assert slow.manifest()["rounds"] == []
    slow.flush()  # an explicit flush always writes
    assert slow.manifest()["rounds"] == ["part-000000.parquet"]

    fast = RunTables(tmp_path / "fast", flush_seconds=0)
    fast.append("rounds", [row])
    fast.maybe_flush()
    assert fast.manifest()["rounds"] == ["part-000000.parquet"]
    assert fast.manifest()["clients"] == []  # tables without rows write nothing


def test_flush_resets_timer(tmp_path):
    t = RunTables(tmp_path, flush_seconds=1e9)
    t.last_flush -= 2e9  # pretend the interval has passed
    t.append("evals", [{f.name: sample_value(f) for f in SCHEMAS["evals"]}])
    t.maybe_flush()
    assert t.manifest()["evals"] == ["part-000000.parquet"]
    t.append("evals", [{f.name: sample_value(f, 1) for f in SCHEMAS["evals"]}])
    t.maybe_flush()  # the timer restarted at the flush
    assert t.manifest()["evals"] == ["part-000000.parquet"]


def test_manifest_and_truncate(tmp_path):
    t = RunTables(tmp_path, flush_seconds=1e9)
    for table, schema in SCHEMAS.items():
        t.append(table, [{f.name: sample_value(f) for f in schema}])
    t.flush()
    manifest = t.manifest()
    assert all(parts == ["part-000000.parquet"] for parts in manifest.values())
    t.append("rounds", [{f.name: sample_value(f, 1) for f in SCHEMAS["rounds"]}])
    t.append("clients", [{f.name: sample_value(f, 1) for f in SCHEMAS["clients"]}])
    t.flush()
    assert t.manifest()["rounds"] == ["part-000000.parquet", "part-000001.parquet"]
    t.truncate_to(manifest)
    assert t.manifest() == manifest
    # a table missing from the manifest is emptied
    t.truncate_to({"rounds": manifest["rounds"]})
    assert t.manifest()["clients"] == [] and t.manifest()["rounds"] == manifest["rounds"]


@pytest.mark.parametrize("table", sorted(SCHEMAS))
def test_every_schema_round_trips(tmp_path, table):
    schema = SCHEMAS[table]
    sample = [{f.name: sample_value(f, i) for f in schema} for i in range(2)]
    t = RunTables(tmp_path, flush_seconds=0)
    t.append(table, sample)
    t.maybe_flush()
    got = pq.read_table(tmp_path / table)
    assert got.schema.remove_metadata() == schema
    assert got.to_pylist() == sample
    df = pd.read_parquet(tmp_path / table)
    assert list(df.columns) == schema.names
    assert len(df) == 2


def test_schemas_have_round_column():
    for name, schema in SCHEMAS.items():
        assert schema.field("round").type == pa.int32(), name
        assert len(set(schema.names)) == len(schema.names), name


def test_an_undeclared_figure_is_an_error_never_a_silent_drop(tmp_path):
    tables = RunTables(tmp_path, flush_seconds=60)
    with pytest.raises(ValueError, match=r"table rounds: undeclared columns \['made_up_figure'\]"):
        tables.append("rounds", [{"round": 1, "made_up_figure": 0.5}])
    tables.append("rounds", [{"round": 1, "dp_epsilon_max": 0.5}])  # declared by DP-SGD: fine


def test_defence_columns_are_every_registered_defences_declarations():
    for plugin in DEFENCES.plugins.values():
        assert set(plugin.client_figures) <= set(SCHEMAS["clients"].names)
        assert set(plugin.round_columns()) <= set(SCHEMAS["rounds"].names)
    assert {"dp_epsilon", "dp_epsilon_max", "lam", "hsic_xz"} <= set(SCHEMAS["rounds"].names)
