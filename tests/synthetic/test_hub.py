"""``csm push`` at the HTTP boundary: a local stand-in for the Hub's endpoints on 127.0.0.1.

The stand-in implements the calls a dataset push makes (repo info/create, preupload, LFS batch and
PUT, tree listing, YAML validation, commit, resolve) and keeps the committed files in memory, so
the test checks what actually arrives: the Parquet shards reload to the same rows and the card is
csm's. Xet is disabled in the child process so uploads use the plain LFS protocol.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pyarrow.parquet as pq
import pytest

from csm.errors import CSMError
from csm.synthetic import SyntheticWriter, load_synthetic
from csm.synthetic.hub import PushConfig, push


class HubStub:
    """A local stand-in for the few Hub HTTP endpoints that dataset pushes use."""

    def __init__(self):
        self.repos = {}
        self.blobs = {}
        self.log = []
        self.commits = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def send(self, code, obj=None, raw=None, headers=None):
                data = (
                    raw if raw is not None else json.dumps(obj if obj is not None else {}).encode()
                )
                self.send_response(code)
                self.send_header(
                    "Content-Type",
                    "application/octet-stream" if raw is not None else "application/json",
                )
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def handle_any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                stub.log.append((self.command, self.path))
                try:
                    stub.route(self, urlparse(self.path), body)
                except Exception as exc:
                    self.send(500, {"error": repr(exc)})

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = handle_any

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def _entries(self, repo, prefix=""):
        out = []
        dirs = set()
        for path, data in sorted(repo["files"].items()):
            if prefix and not path.startswith(prefix.rstrip("/") + "/"):
                continue
            out.append(
                {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest(),
                }
            )
            parts = path.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                dirs.add("/".join(parts[:i]))
        out += [
            {"type": "directory", "path": d, "size": 0, "oid": "0" * 40}
            for d in sorted(dirs)
            if not prefix or d.startswith(prefix.rstrip("/") + "/")
        ]
        return out

    def route(self, h, u, body):
        p = unquote(u.path)
        auth = h.headers.get("Authorization", "")
        not_found = {"x-error-code": "RepoNotFound"}
        if p == "/api/agent-harnesses":
            return h.send(200, {"standardEnvVars": [], "harnesses": {}})
        if p == "/api/validate-yaml":
            return h.send(200, {"errors": [], "warnings": []})
        if p == "/api/repos/create" and h.command == "POST":
            if auth != "Bearer hf_good":
                return h.send(401, {"error": "Invalid credentials"})
            req = json.loads(body)
            rid = f"{req['organization']}/{req['name']}"
            self.repos.setdefault(
                rid,
                {
                    "files": {},
                    "sha": "0" * 40,
                    "private": req.get("private", False) or req.get("visibility") == "private",
                },
            )
            kind = req.get("type") or "model"
            self.repos[rid].setdefault("type", kind)
            prefix = "" if kind == "model" else f"{kind}s/"
            return h.send(200, {"url": f"{self.url}/{prefix}{rid}", "name": rid})
        m = re.match(r"^/api/(models|datasets)/([^/]+/[^/]+)(/.*)?$", p)
        if m:
            rid, rest = m.group(2), m.group(3) or ""
            repo = self.repos.get(rid)
            if repo is None:
                return h.send(404, {"error": "Repository not found"}, headers=not_found)
            if rest == "" or rest.startswith("/revision/"):
                return h.send(
                    200,
                    {
                        "id": rid,
                        "sha": repo["sha"],
                        "private": repo["private"],
                        "siblings": [{"rfilename": f} for f in sorted(repo["files"])],
                    },
                )
            if rest.startswith("/preupload/"):
                files = json.loads(body)["files"]
                return h.send(
                    200,
                    {
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "lfs"
                                if f["path"].endswith((".parquet", ".safetensors"))
                                else "regular",
                                "shouldIgnore": False,
                            }
                            for f in files
                        ]
                    },
                )
            if rest.startswith("/commit/"):
                if auth != "Bearer hf_good":
                    return h.send(401, {"error": "Invalid credentials"})
                self.commits.append(rid)
                for line in body.decode().splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo["files"][item["value"]["path"]] = base64.b64decode(
                            item["value"]["content"]
                        )
                    elif item["key"] == "deletedFile":
                        repo["files"].pop(item["value"]["path"], None)
                    elif item["key"] == "lfsFile":
                        repo["files"][item["value"]["path"]] = self.blobs[item["value"]["oid"]]
                    elif item["key"] != "header":
                        return h.send(400, {"error": f"unsupported {item['key']}"})
                repo["sha"] = hashlib.sha1(
                    json.dumps(
                        sorted((k, hashlib.sha1(v).hexdigest()) for k, v in repo["files"].items())
                    ).encode()
                ).hexdigest()
                return h.send(
                    200,
                    {
                        "commitUrl": f"{self.url}/datasets/{rid}/commit/{repo['sha']}",
                        "commitOid": repo["sha"],
                        "success": True,
                    },
                )
            m2 = re.match(r"^/tree/[^/]+/?(.*)$", rest)
            if m2:
                prefix = m2.group(1)
                recursive = parse_qs(u.query).get("recursive", ["false"])[0] in (
                    "true",
                    "True",
                    "1",
                )
                entries = self._entries(repo, prefix)
                if prefix and not entries:
                    return h.send(
                        404, {"error": "Entry not found"}, headers={"x-error-code": "EntryNotFound"}
                    )
                if not recursive:
                    depth = prefix.count("/") + (1 if prefix else 0)
                    entries = [e for e in entries if e["path"].count("/") == depth]
                return h.send(200, entries)
            if rest.startswith("/paths-info/"):
                form = parse_qs(body.decode())
                paths = form.get("paths", [])
                if not paths and body.startswith(b"{"):
                    paths = json.loads(body).get("paths", [])
                all_entries = {e["path"]: e for e in self._entries(repo)}
                return h.send(200, [all_entries[x] for x in paths if x in all_entries])
            return h.send(404, {"error": f"no route {p}"})
        m = re.match(r"^/(?:datasets/)?([^/]+/[^/]+)\.git/info/lfs/objects/batch$", p)
        if m and h.command == "POST":
            objs = json.loads(body)["objects"]
            return h.send(
                200,
                {
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"{self.url}/lfs-upload/{o['oid']}"}},
                        }
                        for o in objs
                    ],
                },
            )
        if p.startswith("/lfs-upload/") and h.command == "PUT":
            oid = p.rsplit("/", 1)[1]
            if hashlib.sha256(body).hexdigest() != oid:
                return h.send(400, {"error": "sha256 mismatch"})
            self.blobs[oid] = body
            return h.send(200, {})
        m = re.match(r"^/(?:datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", p)
        if m:
            repo = self.repos.get(m.group(1))
            if repo is None:
                return h.send(404, {"error": "Repository not found"}, headers=not_found)
            data = repo["files"].get(m.group(3))
            if data is None:
                return h.send(
                    404, {"error": "Entry not found"}, headers={"x-error-code": "EntryNotFound"}
                )
            return h.send(
                200,
                raw=data,
                headers={
                    "X-Repo-Commit": repo["sha"],
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                },
            )
        return h.send(404, {"error": f"no route {p}"})


@pytest.fixture()
def stub():
    s = HubStub()
    yield s
    s.close()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hub") / "syn"
    w = SyntheticWriter(out, ["cat", "dog", "frog"], {"group_size": 3, "dataset": "toy"}, 2, 3)
    rng = np.random.default_rng(0)
    for i in w.pending_shards():
        groups = w.shard_groups(i)
        n = len(groups) * 3
        gid = np.repeat(list(groups), 3)
        w.write_shard(
            i,
            rng.integers(0, 256, (n, 3, 6, 6), dtype=np.uint8),
            [0] * n,
            [2] * n,
            [0.0, 0.5, 1.0] * len(groups),
            gid,
            gid + 7,
        )
    w.finalize()
    return out


def test_push_uploads_parquet_and_card(stub, dataset, tmp_path):
    env = {
        **os.environ,
        "HF_ENDPOINT": stub.url,
        "HF_TOKEN": "hf_good",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(tmp_path / "hf"),
    }
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "csm",
            "push",
            str(dataset),
            "--repo-id",
            "alice/csm-toy",
            "--private",
            "--license",
            "cc-by-4.0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "alice/csm-toy" in proc.stdout
    repo = stub.repos["alice/csm-toy"]
    assert repo["private"] is True
    shards = sorted(p for p in repo["files"] if p.startswith("data/train-"))
    assert shards and all(p.endswith(".parquet") for p in shards)
    table = pq.read_table(io.BytesIO(repo["files"][shards[0]]))
    local = load_synthetic(dataset)
    assert table.num_rows == len(local) == 9
    assert table.column("group_id").to_pylist() == local["group_id"]
    assert table.column("soft_label").to_pylist()[1] == [0.5, 0.0, 0.5]
    images = table.column("image").to_pylist()
    assert images[4]["bytes"] == local.with_format("arrow")["image"][4].as_py()["bytes"]
    card = repo["files"]["README.md"].decode()
    assert "path: data/train-*" in card and "task_categories" in card
    assert "## How it was generated" in card and "dataset_info:" in card
    assert any(m == "POST" and "lfs/objects/batch" in p for m, p in stub.log)
    assert stub.commits == ["alice/csm-toy"]  # one commit: shards and card together


def test_push_without_token_names_the_fix(dataset, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(CSMError, match="no Hugging Face token.*HF_TOKEN"):
        push(PushConfig(dataset=str(dataset), repo_id="alice/x"))


def test_push_offline_and_unreachable(dataset, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CSMError, match="offline mode"):
        push(PushConfig(dataset=str(dataset), repo_id="alice/x", token="hf_good", license="mit"))
    # a port nobody listens on
    s = HubStub()
    url = s.url
    s.close()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", url)
    with pytest.raises(CSMError, match="cannot reach"):
        push(PushConfig(dataset=str(dataset), repo_id="alice/x", token="hf_good", license="mit"))


def test_push_rejected_token_and_bad_input(dataset, stub, monkeypatch, tmp_path):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", stub.url)
    with pytest.raises(CSMError, match="HTTP 401"):
        push(PushConfig(dataset=str(dataset), repo_id="alice/x", token="hf_bad", license="mit"))
    with pytest.raises(CSMError, match="--repo-id 'nope'"):
        push(PushConfig(dataset=str(dataset), repo_id="nope", token="hf_good"))
    with pytest.raises(CSMError, match="not a csm synthetic dataset, generator or classifier"):
        push(PushConfig(dataset=str(tmp_path), repo_id="alice/x", token="hf_good"))
    assert stub.repos == {}


@pytest.fixture()
def hub(stub, monkeypatch):
    """The stand-in Hub as the endpoint of in-process pushes (plain LFS, not Xet)."""
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", stub.url)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", stub.url)
    return stub


def _card(stub, rid):
    from huggingface_hub import DatasetCard

    return DatasetCard(stub.repos[rid]["files"]["README.md"].decode())


def test_push_twice_one_commit_each_and_the_same_valid_card(hub, dataset):
    cfg = PushConfig(dataset=str(dataset), repo_id="alice/twice", token="hf_good", license="mit")
    push(cfg)
    first = hub.repos["alice/twice"]["files"]["README.md"].decode()
    files_first = sorted(hub.repos["alice/twice"]["files"])
    push(cfg)
    second = hub.repos["alice/twice"]["files"]["README.md"].decode()
    assert hub.commits == ["alice/twice", "alice/twice"]
    assert second == first and "---\n---" not in second and second.count("\n---\n") == 1
    assert sorted(hub.repos["alice/twice"]["files"]) == files_first
    data = _card(hub, "alice/twice").data.to_dict()
    assert (
        data["license"] == "mit" and data["configs"][0]["data_files"][0]["path"] == "data/train-*"
    )
    info = data["dataset_info"]
    assert info["splits"][0]["num_examples"] == 9 and info["download_size"] > 0
    assert [f["name"] for f in info["features"]][:2] == ["image", "label"]
    # provenance without local paths; the csm block rebuilds the data
    assert str(dataset.parent) not in second and data["csm"]["generation"]["group_size"] == 3


def test_push_refuses_an_unknown_licence_without_flag(hub, dataset):
    with pytest.raises(CSMError, match="--license"):
        push(PushConfig(dataset=str(dataset), repo_id="alice/nolic", token="hf_good"))
    assert hub.commits == []


def test_push_generator_and_classifier_run(hub, tmp_path):
    import torch
    from diffusers import DDIMScheduler
    from huggingface_hub import ModelCard

    from csm.generation.card import export_pipeline_files
    from csm.generation.pipeline import CSMMixingPipeline, build_unet
    from tests.helpers import make_run

    torch.manual_seed(0)
    unet = build_unet(2, image_size=8, in_channels=1, block_out_channels=(8,), norm_num_groups=4)
    gen = tmp_path / "gen"
    CSMMixingPipeline(unet=unet, scheduler=DDIMScheduler(), class_names=["a", "b"]).save_pretrained(
        gen
    )
    with pytest.raises(CSMError, match="python -m csm.generation.card"):
        push(PushConfig(dataset=str(gen), repo_id="alice/gen", token="hf_good"))
    export_pipeline_files(gen)
    (gen / "checkpoints").mkdir()
    (gen / "checkpoints" / "junk.bin").write_bytes(b"x")
    assert "the generator" in push(
        PushConfig(dataset=str(gen), repo_id="alice/gen", token="hf_good")
    )
    files = hub.repos["alice/gen"]["files"]
    assert {"model_index.json", "pipeline_csm.py", "README.md"} <= set(files)
    assert (
        "unet/diffusion_pytorch_model.safetensors" in files and "checkpoints/junk.bin" not in files
    )
    assert hub.repos["alice/gen"]["type"] == "model"

    run = make_run(tmp_path / "run", ["a", "b"], info={"method": "focal", "val/cal/ECE": 0.05})
    push(PushConfig(dataset=str(run), repo_id="alice/run", token="hf_good"))
    files = hub.repos["alice/run"]["files"]
    assert {"model.safetensors", "model.json", "config.yaml", "class_names.json"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "pytorch" and card.data.license == "cc-by-4.0"  # digits
    assert "method `focal`" in card.text and "| `val/cal/ECE` | 0.05 |" in card.text
    assert hub.commits == ["alice/gen", "alice/run"]
