"""The server's floor for the CPU-bound case: what any client must wait for.

Reads the company CSV, builds every add-runs body up front (the same inputs, processor and
output schema that groupflow and parallel-cli send), then times only the API: create the
group, POST the bodies (1,000 runs each, 4 at a time), poll the group every 50 ms until it
is inactive, and read /runs?include_output=true to nowhere. Prints the phases and, last,
`floor_seconds <total>`. Python standard library only.

Usage: floor.py BASE_URL API_KEY CSV
"""

import concurrent.futures
import csv
import hashlib
import json
import sys
import time
import urllib.request

base, key, path = sys.argv[1:4]
headers = {"x-api-key": key, "content-type": "application/json"}
spec = {
    "output_schema": {
        "type": "json",
        "json_schema": {
            "type": "object",
            "properties": {
                "ceo_name": {"type": "string", "description": "Name of the current CEO"},
                "founded_year": {"type": "integer", "description": "Year the company was founded"},
                "headquarters": {"type": "string", "description": "City of the headquarters"},
                "employee_count": {"type": "integer", "description": "Number of employees"},
                "key_insights": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "Key business insights",
                },
            },
            "required": ["ceo_name", "founded_year", "headquarters", "employee_count", "key_insights"],
        },
    }
}


def request(method, url_path, body=None):
    req = urllib.request.Request(base + url_path, data=body, method=method, headers=headers)
    return urllib.request.urlopen(req)


with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
bodies = []
for start in range(0, len(rows), 1000):
    inputs = []
    for row in rows[start : start + 1000]:
        data = {"name": row["name"], "website": row["website"], "country": row["country"]}
        row_key = hashlib.md5(json.dumps(data, sort_keys=True).encode()).hexdigest()
        inputs.append({"input": data, "processor": "core", "metadata": {"gf_row": row_key}})
    bodies.append(json.dumps({"default_task_spec": spec, "inputs": inputs}).encode())

t0 = time.monotonic()
group = json.load(request("POST", "/v1/tasks/groups", b"{}"))["taskgroup_id"]
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    list(pool.map(lambda b: request("POST", f"/v1/tasks/groups/{group}/runs", b).read(), bodies))
t1 = time.monotonic()
while json.load(request("GET", f"/v1/tasks/groups/{group}"))["status"]["is_active"]:
    time.sleep(0.05)
t2 = time.monotonic()
size = 0
with request("GET", f"/v1/tasks/groups/{group}/runs?include_output=true") as r:
    while chunk := r.read(1 << 20):
        size += len(chunk)
t3 = time.monotonic()
print(f"add {t1 - t0:.2f} s, run {t2 - t1:.2f} s, read {t3 - t2:.2f} s ({size / 1e6:.0f} MB)")
print(f"floor_seconds {t3 - t0:.3f}")
