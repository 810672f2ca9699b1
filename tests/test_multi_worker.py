"""Multi-worker training: 2 worker processes on 127.0.0.1, killed and restarted.

`sparta-train --strategy=multi_worker` runs MultiWorkerMirroredStrategy over the cluster of
TF_CONFIG. The test runs a tiny 2-worker job to the end, then the same job again with one
worker killed by SIGKILL after the first checkpoint: the other stops (TensorFlow's health
check sees the dead peer), both are restarted with the same command, resume from the last
checkpoint, and must end with the weights of the uninterrupted job.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np

from sparta_tf import layers  # noqa: F401  (registers Sparta for loading)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(model_dir, ports, logs):
    """Starts one trainer process per worker; returns them, worker 0 (the chief) first."""
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(len(ports)):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        log = open(logs / f"worker{index}_{time.monotonic_ns()}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "trainers.train", "--strategy=multi_worker",
             f"--model_dir={model_dir}", "--model=resnet10", "--max_train=64", "--max_test=8",
             "--width_multiplier=0.0625", "--epochs=2", "--batch_size=32", "--pgd_steps=1",
             "--eval_pgd_steps=0", "--checkpoint_every=1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True))
        procs[-1].log = log.name
    return procs


def _wait(procs):
    deadline = time.time() + TIMEOUT_S
    for p in procs:
        p.wait(timeout=max(1, deadline - time.time()))
    return [p.returncode for p in procs], [open(p.log).read() for p in procs]


def _weights(model_dir):
    return keras.models.load_model(os.path.join(model_dir, "model.keras")).get_weights()


def test_two_workers_killed_and_restarted_end_as_an_uninterrupted_job(tmp_path):
    straight = tmp_path / "straight"
    codes, outs = _wait(_start(straight, _free_ports(2), tmp_path))
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "exported" in outs[0] and "the chief saves" in outs[1]
    # Only the chief's files are left, and one line per epoch.
    assert sorted(os.listdir(straight)) == [".lock", "checkpoints", "class_names.json",
                                            "config.json",
                                            "export", "logs", "metrics.jsonl", "model.keras",
                                            "results.json"]
    assert [json.loads(l)["epoch"] for l in open(straight / "metrics.jsonl")] == [1, 2]

    killed, ports = tmp_path / "killed", _free_ports(2)
    procs = _start(killed, ports, tmp_path)
    index = killed / "checkpoints" / "ckpt-1"
    deadline = time.time() + TIMEOUT_S
    while not index.exists() and procs[0].poll() is None and time.time() < deadline:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)  # worker 1 dies after the first checkpoint
    codes, outs = _wait(procs)
    assert codes[1] == -signal.SIGKILL
    assert codes[0] != 0, "the chief finished although its peer was killed"
    assert "another worker of the job stopped" in outs[0] and "Traceback" not in outs[0]
    assert not (killed / "model.keras").exists()

    codes, outs = _wait(_start(killed, ports, tmp_path))  # the same command again
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "Resuming" in outs[0]
    for a, b in zip(_weights(straight), _weights(killed)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
