"""What quantum_serverless 0.1.2's `run` sends: the working dir packed with
`tarfile` (PAX headers; the half-written `artifact.tar` itself lands in the
archive, since it is created inside the directory it packs), posted as
multipart with `requests` and only an Authorization header. The function's
code comes from LEGACY_MAIN. Prints {"status": ..., "body": ...}."""
import json
import os
import tarfile
import tempfile

import requests

host = os.environ["GATEWAY_URL"]
token = os.environ["GATEWAY_TOKEN"]

working_dir = tempfile.mkdtemp()
with open(os.path.join(working_dir, "main.py"), "w") as f:
    f.write(os.environ["LEGACY_MAIN"])
os.makedirs(os.path.join(working_dir, "data"))
with open(os.path.join(working_dir, "data", "notes.txt"), "w") as f:
    f.write("a nested file\n")

artifact_file_path = os.path.join(working_dir, "artifact.tar")
with tarfile.open(artifact_file_path, "w") as tar:
    for filename in os.listdir(working_dir):
        fpath = os.path.join(working_dir, filename)
        tar.add(fpath, arcname=filename)

with open(artifact_file_path, "rb") as file:
    response = requests.post(
        url=f"{host}/api/v1/programs/run/",
        data={
            "title": "legacy-doubler",
            "entrypoint": "main.py",
            "arguments": json.dumps({"x": 21}),
            "dependencies": json.dumps([]),
        },
        files={"artifact": file},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
try:
    body = response.json()
except ValueError:
    body = response.text
print(json.dumps({"status": response.status_code, "body": body}))
