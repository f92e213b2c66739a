"""The current client (qiskit-serverless 0.37) against the gateway: upload,
run with arguments, result, logs, a failing function, a stop while RUNNING,
and the job list. Prints one JSON document with what it saw."""
import json
import os
import tempfile
import time

from qiskit_serverless import QiskitFunction, ServerlessClient

client = ServerlessClient(host=os.environ["GATEWAY_URL"], token=os.environ["GATEWAY_TOKEN"], channel="local")


def function(title, body):
    d = tempfile.mkdtemp()
    with open(os.path.join(d, "main.py"), "w") as f:
        f.write(body)
    client.upload(QiskitFunction(title=title, entrypoint="main.py", working_dir=d))


function("adder", """
from qiskit_serverless import get_arguments, save_result
args = get_arguments()
print(f"adding {args['a']} and {args['b']}")
save_result({"sum": args["a"] + args["b"]})
""")
function("failer", """
print("about to fail")
raise ValueError("boom from the function")
""")
function("sleeper", """
import time
print("sleeping now", flush=True)
time.sleep(300)
""")

out = {}
job = client.run("adder", arguments={"a": 2, "b": 40})
out["adder_id"] = job.job_id
out["adder_result"] = job.result(cadence=1)
out["adder_status"] = job.status()
out["adder_logs"] = job.logs()

failing = client.run("failer")
out["failer_id"] = failing.job_id
try:
    failing.result(cadence=1)
    out["failer_raised"] = None
except Exception as e:  # the client raises for ERROR jobs
    out["failer_raised"] = str(e)
out["failer_status"] = failing.status()
out["failer_logs"] = failing.logs()

sleeping = client.run("sleeper")
out["sleeper_id"] = sleeping.job_id
deadline = time.time() + 60
while sleeping.status() != "RUNNING" and time.time() < deadline:
    time.sleep(0.2)
out["sleeper_before_stop"] = sleeping.status()
try:
    out["stop_message"] = sleeping.stop()
except TypeError as e:
    # qiskit-serverless 0.37 with channel="local" builds a local
    # QiskitRuntimeService and then fails to JSON-encode it, before any
    # request is sent. Send what it means to send.
    import requests
    out["client_stop_bug"] = str(e)
    r = requests.post(
        f"{os.environ['GATEWAY_URL']}/api/v1/jobs/{sleeping.job_id}/stop/",
        headers={"Authorization": f"Bearer {os.environ['GATEWAY_TOKEN']}", "Service-Channel": "local"},
        json={"service": json.dumps(None)},
        timeout=30,
    )
    out["stop_message"] = r.json()["message"]
deadline = time.time() + 30
while sleeping.status() != "CANCELED" and time.time() < deadline:
    time.sleep(0.2)
out["sleeper_status"] = sleeping.status()
out["sleeper_logs"] = sleeping.logs()
out["jobs"] = [j.job_id for j in client.jobs()]
out["functions"] = sorted(f.title for f in client.functions())
print(json.dumps(out))
