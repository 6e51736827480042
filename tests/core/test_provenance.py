"""The record of where a run was made, and what two records must share to give the same numbers."""

from __future__ import annotations

import json

from simfl.core.determinism import cpu_kernel_env
from simfl.core.provenance import MUST_MATCH, cpu_model, environment, mismatches


def test_the_record_names_the_machine_the_kernels_and_the_versions():
    env = environment()
    assert set(MUST_MATCH) <= set(env)
    assert env["kernels"] == cpu_kernel_env()
    assert env["cpu"] == cpu_model() and env["cpu"]
    assert env["versions"]["torch"] and env["versions"]["simfl"]
    assert json.loads(json.dumps(env)) == env  # written as JSON, read back the same


def test_records_disagreeing_on_what_decides_the_numbers_are_named_field_by_field():
    a = environment()
    assert mismatches(a, dict(a, python="0.0")) == []  # informative only
    b = dict(a, cpu="Other CPU", kernels={"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AVX2"})
    assert mismatches(a, b) == [f"cpu: {a['cpu']!r} against 'Other CPU'",
                                f"kernels: {a['kernels']!r} against {b['kernels']!r}"]
