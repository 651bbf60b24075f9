"""The official Python SDK (parallel-web==1.3.7), unmodified, against `groupflow serve`.

Run by tests/sdk_compat.rs with PARALLEL_BASE_URL and PARALLEL_API_KEY set. Responses are
validated strictly (`_strict_response_validation=True`), so a missing or mistyped field
fails here even where the SDK would otherwise be lenient.
"""

import os
import sys

import parallel
from parallel.types import (
    TaskGroup,
    TaskGroupRunResponse,
    TaskGroupStatusEvent,
    TaskRun,
    TaskRunEvent,
    TaskRunJsonOutput,
    TaskRunResult,
    TaskRunTextOutput,
)

client = parallel.Parallel(
    base_url=os.environ["PARALLEL_BASE_URL"],
    api_key=os.environ["PARALLEL_API_KEY"],
    _strict_response_validation=True,
    max_retries=0,
)

SPEC = {
    "input_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {"company": {"type": "string"}},
            "required": ["company"],
        },
    },
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {
                "market_position": {"type": "string"},
                "founded_year": {"type": "integer"},
                "key_insights": {"type": "array", "items": {"type": "string"}},
                "public": {"type": "boolean"},
                "founded": {"type": "string", "format": "date"},
                "ceo": {"type": ["string", "null"]},
            },
            "required": ["market_position", "founded_year", "key_insights"],
            "additionalProperties": False,
        },
    },
}


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)


# task_group.create / retrieve
group = client.task_group.create(metadata={"suite": "compat", "n": 1})
check(isinstance(group, TaskGroup), "create returns TaskGroup")
gid = group.task_group_id
check(gid.startswith("tgrp_"), f"group id {gid}")
check(group.status.num_task_runs == 0 and not group.status.is_active, "empty group is inactive")
check(group.status.task_run_status_counts == {}, "no counts for an empty group")
check(group.metadata == {"suite": "compat", "n": 1}, f"metadata {group.metadata}")

# task_group.add_runs: a default spec, then per-run text specs with refresh_status=False
companies = ["Stripe", "Shopify", "Salesforce", "Snowflake", "Square"]
first = client.task_group.add_runs(
    gid,
    default_task_spec=SPEC,
    inputs=[
        {"input": {"company": c}, "processor": "core", "metadata": {"row": str(i)}}
        for i, c in enumerate(companies)
    ],
)
check(isinstance(first, TaskGroupRunResponse), "add_runs returns TaskGroupRunResponse")
check(len(first.run_ids) == 5 and all(r.startswith("trun_") for r in first.run_ids), "run ids")
check(first.run_cursor is None and first.event_cursor is None, "first batch has no cursors")
check(first.status.num_task_runs == 5, "status counts the new runs")
second = client.task_group.add_runs(
    gid,
    refresh_status=False,
    inputs=[
        {"input": "Who founded Parallel?", "processor": "lite-fast", "task_spec": {"output_schema": "A short answer"}},
        {"input": "Describe Rust.", "processor": "ultra2x", "task_spec": {"output_schema": {"type": "text"}}},
    ],
)
check(second.run_cursor is not None and second.event_cursor is not None, "later batches have cursors")
run_ids = first.run_ids + second.run_ids

# task_group.events: follows the group until it is inactive, then the stream ends
statuses, finished = [], set()
for event in client.task_group.events(gid, last_event_id=None, api_timeout=60):
    if isinstance(event, TaskGroupStatusEvent):
        statuses.append(event.status)
    else:
        check(isinstance(event, TaskRunEvent), f"event type {type(event)}")
        check(event.run.task_group_id == gid, "run events name their group")
        if event.run.status in ("completed", "failed"):
            finished.add(event.run.run_id)
check(statuses and not statuses[-1].is_active, "the last status is inactive")
check(statuses[-1].task_run_status_counts == {"completed": 7}, f"counts {statuses[-1]}")
check(finished == set(run_ids), "a completion event for every run")

done = client.task_group.retrieve(gid)
check(not done.status.is_active and done.status.num_task_runs == 7, "retrieve after completion")
check(done.status.task_run_status_counts == {"completed": 7}, "only non-zero counts")

# task_group.get_runs: every run, in order, with inputs and outputs
events = list(client.task_group.get_runs(gid, include_input=True, include_output=True))
check([e.run.run_id for e in events] == run_ids, "runs in the order added")
for e in events[:5]:
    check(isinstance(e, TaskRunEvent) and e.run.status == "completed", "completed run event")
    check(e.input is not None and e.input.input["company"] in companies, "input included")
    check(isinstance(e.output, TaskRunJsonOutput), f"json output {type(e.output)}")
    content = e.output.content
    check(isinstance(content["founded_year"], int), "integer field")
    check(isinstance(content["key_insights"], list), "array field")
    check(isinstance(content["public"], bool), "boolean field")
    check(content["ceo"] is None or isinstance(content["ceo"], str), "nullable field")
    check({b.field for b in e.output.basis} == set(content), "basis for every field")
    check(all(b.citations and b.confidence for b in e.output.basis), "citations and confidence")
for e in events[5:]:
    check(isinstance(e.output, TaskRunTextOutput), "text output for text specs")
    check(e.output.basis[0].field == "output", "text basis is `output`")

# resume from a cursor, and filter by status
rest = list(client.task_group.get_runs(gid, last_event_id=events[2].event_id))
check([e.run.run_id for e in rest] == run_ids[3:], "resume after a cursor")
check(all(e.output is None and e.input is None for e in rest), "no input/output unless asked")
tail = list(client.task_group.get_runs(gid, last_event_id=second.run_cursor))
check([e.run.run_id for e in tail] == second.run_ids, "run_cursor starts at its batch")
check(list(client.task_group.get_runs(gid, status="failed")) == [], "status filter")

# task_group.retrieve_run
run = client.task_group.retrieve_run(run_ids[1], task_group_id=gid)
check(isinstance(run, TaskRun) and run.run_id == run_ids[1], "retrieve_run")
check(run.metadata == {"row": "1"} and run.task_group_id == gid, "run metadata and group")

# task_run.create / retrieve / result
created = client.task_run.create(
    input={"company": "Parallel"},
    processor="pro",
    task_spec=SPEC,
    metadata={"k": "v"},
)
check(isinstance(created, TaskRun) and created.status == "queued" and created.is_active, "create")
fetched = client.task_run.retrieve(created.run_id)
check(fetched.run_id == created.run_id and fetched.processor == "pro", "retrieve")
result = client.task_run.result(created.run_id, api_timeout=30)
check(isinstance(result, TaskRunResult) and result.run.status == "completed", "result")
check(isinstance(result.output, TaskRunJsonOutput), "json result")
check(set(result.output.content) == set(SPEC["output_schema"]["json_schema"]["properties"]), "all fields")
again = client.task_run.result(
    client.task_run.create(input={"company": "Parallel"}, processor="pro", task_spec=SPEC).run_id,
    api_timeout=30,
)
check(again.output.content == result.output.content, "same input, same output")

# errors map to the SDK's exception types
try:
    client.task_run.retrieve("trun_00000000000000000000000000000000")
    check(False, "unknown run must raise")
except parallel.NotFoundError as e:
    check(e.status_code == 404, "404 for an unknown run")
try:
    client.task_group.add_runs(gid, inputs=[{"input": "x", "processor": "core"}] * 1001)
    check(False, "1001 inputs must raise")
except parallel.UnprocessableEntityError as e:
    check(e.status_code == 422, "422 for too many inputs")

print("sdk 1.3.7 compatibility: ok")
