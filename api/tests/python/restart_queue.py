"""Uploads a function that leaves one marker line per run, then queues
several runs of it. Prints the job ids."""
import json
import os
import tempfile

from qiskit_serverless import QiskitFunction, ServerlessClient

client = ServerlessClient(host=os.environ["GATEWAY_URL"], token=os.environ["GATEWAY_TOKEN"], channel="local")
d = tempfile.mkdtemp()
with open(os.path.join(d, "main.py"), "w") as f:
    f.write("""
import os, time
from qiskit_serverless import get_arguments, save_result
args = get_arguments()
with open(os.path.join(args["dir"], f"marker-{args['n']}"), "a") as m:
    m.write("ran\\n")
time.sleep(2)
save_result({"n": args["n"]})
""")
client.upload(QiskitFunction(title="marker", entrypoint="main.py", working_dir=d))
jobs = [client.run("marker", arguments={"n": n, "dir": os.environ["MARKER_DIR"]}).job_id for n in range(int(os.environ["RUNS"]))]
print(json.dumps({"jobs": jobs}))
