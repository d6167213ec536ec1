"""Schema-driven fuzzing of the judge API (schemathesis, bounded): no 5xx, every refusal a typed JSON error."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from tests.conftest import JUDGE_KEY

pytestmark = pytest.mark.slow
ERROR_TYPES = {"invalid_request", "unauthorized", "not_found", "conflict", "too_large", "overloaded", "method_not_allowed"}


def test_fuzzed_requests_never_crash_the_judge(judge):
    schema = schemathesis.openapi.from_url(f"{judge.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 14  # 5 judging endpoints (propose too), their 5 batch forms, health, constitution, backends, metrics
    seen: dict[int, int] = {}

    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
        def check(case):
            response = case.call(headers={"Authorization": f"Bearer {JUDGE_KEY}"}, timeout=300)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:500]}"
            if response.status_code >= 400:
                body = response.json()
                assert set(body) == {"error"}, body
                assert body["error"]["type"] in ERROR_TYPES and body["error"]["message"]

        check()
    assert seen.get(200, 0) > 0 and seen.get(422, 0) > 0  # the fuzzer reached both the judge and its validation
