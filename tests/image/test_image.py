"""The OCI image `make image` builds (scripts/image): a valid OCI image layout (index, manifest,
config and layers with matching digests, as the OCI image spec defines them, and readable by
skopeo), the config users and KServe rely on (entrypoint /app/pd-sidecar, user 65532, env), and
the binaries starting from the unpacked root filesystem with only the image's own libraries
(the image's dynamic loader, no host library path), KServe's rendered sidecar command line
included. Run by `make image-test` (which builds the image first); `.ci/run` runs it."""

import gzip
import hashlib
import json
import os
import pathlib
import re
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAYOUT = pathlib.Path(os.environ.get("IMAGE_DIR", ROOT / "bench-out" / "image" / "oci"))
CHART = (ROOT / "charts" / "tandem" / "Chart.yaml").read_text()
TAG = os.environ.get("IMAGE_TAG") or re.search(r'^appVersion:\s*"?([^"\n]+)"?', CHART, re.M).group(1)


def blob(digest):
    algo, hexd = digest.split(":")
    assert algo == "sha256"
    path = LAYOUT / "blobs" / "sha256" / hexd
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == hexd, f"{digest}: content does not match its digest"
    return data


@pytest.fixture(scope="module")
def image():
    layout = json.loads((LAYOUT / "oci-layout").read_text())
    assert layout["imageLayoutVersion"] == "1.0.0"
    index = json.loads((LAYOUT / "index.json").read_text())
    assert index["schemaVersion"] == 2
    refs = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    assert TAG in refs, f"tag {TAG} not in {sorted(refs)}"
    desc = refs[TAG]
    assert desc["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    raw = blob(desc["digest"])
    assert len(raw) == desc["size"]
    manifest = json.loads(raw)
    assert manifest["config"]["mediaType"] == "application/vnd.oci.image.config.v1+json"
    config = json.loads(blob(manifest["config"]["digest"]))
    return manifest, config


def test_config_is_what_kserve_and_llm_d_expect(image):
    _, config = image
    assert config["os"] == "linux" and config["architecture"] == "amd64"
    c = config["config"]
    assert c["Entrypoint"] == ["/app/pd-sidecar"]
    assert c["User"] == "65532:65532"
    env = dict(e.split("=", 1) for e in c["Env"])
    assert env["PATH"].split(":")[0] == "/app"
    assert env["TANDEM_NIXL_LIB_DIR"] == "/opt/nixl/lib"
    assert "8000/tcp" in c["ExposedPorts"]
    assert c["Labels"]["org.opencontainers.image.version"] == TAG


@pytest.fixture(scope="module")
def rootfs(image, tmp_path_factory):
    manifest, config = image
    diff_ids = config["rootfs"]["diff_ids"]
    assert config["rootfs"]["type"] == "layers"
    assert len(diff_ids) == len(manifest["layers"]) >= 1
    root = tmp_path_factory.mktemp("rootfs")
    for layer, diff_id in zip(manifest["layers"], diff_ids):
        assert layer["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        data = blob(layer["digest"])
        assert len(data) == layer["size"]
        raw = gzip.decompress(data)
        assert "sha256:" + hashlib.sha256(raw).hexdigest() == diff_id, "diff_id is not the uncompressed layer"
        path = root.parent / (root.name + ".tar")
        path.write_bytes(raw)
        with tarfile.open(path) as tar:
            tar.extractall(root, filter="tar")
    return root


def test_layout_and_files(rootfs):
    for b in ["pd-sidecar", "pd-router", "kv-agent", "kvbench"]:
        f = rootfs / "app" / b
        assert f.is_file() and os.access(f, os.X_OK), b
    assert (rootfs / "lib64" / "ld-linux-x86-64.so.2").exists()
    assert any((rootfs / "opt" / "nixl").rglob("libnixl_capi.so*")), "NIXL's C API library is missing"
    passwd = (rootfs / "etc" / "passwd").read_text()
    assert "nonroot:x:65532:65532:" in passwd
    # No shell is needed, and none is shipped.
    assert not (rootfs / "bin" / "sh").exists()


def in_image(rootfs, args, env=None):
    """Runs a binary of the image with the image's loader and only its libraries."""
    libs = ":".join(
        str(rootfs / d)
        for d in ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib"]
        if (rootfs / d).is_dir()
    )
    loader = rootfs / "lib64" / "ld-linux-x86-64.so.2"
    exe = rootfs / args[0].lstrip("/")
    cmd = [str(loader), "--inhibit-cache", "--library-path", libs, str(exe), *args[1:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={"HOME": "/tmp", **(env or {})})


def test_every_library_resolves_inside_the_image(rootfs):
    """The binaries and every NIXL/UCX library resolve all their dependencies to files of the
    image: the loader would otherwise fall back to this machine's libraries silently."""
    libs = ":".join(
        str(rootfs / d)
        for d in ["lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu", "lib64", "usr/lib"]
        if (rootfs / d).is_dir()
    )
    files = [rootfs / "app" / b for b in ["pd-sidecar", "pd-router", "kv-agent", "kvbench"]]
    files += [p for p in (rootfs / "opt" / "nixl").rglob("*.so*") if p.is_file()]
    outside = []
    optional = []
    for f in files:
        # Plugins that need software the wheel does not bring (a storage client, say) load
        # nowhere without it; NIXL skips them. Only they may fail here.
        host = subprocess.run(["ldd", str(f)], capture_output=True, text=True, timeout=30)
        if "not found" in host.stdout:
            optional.append(f.name)
            continue
        res = subprocess.run(
            [str(rootfs / "lib64" / "ld-linux-x86-64.so.2"), "--list", "--inhibit-cache", "--library-path", libs, str(f)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, (f, res.stderr)
        for line in res.stdout.splitlines():
            if "=>" in line:
                target = line.split("=>", 1)[1].strip().split(" (")[0]
                if not target.startswith(str(rootfs)):
                    outside.append((f.name, line.strip()))
    assert len(files) - len(optional) > 10, optional
    assert not any(n.startswith("libnixl") or n.startswith("libucp") for n in optional), optional
    assert not outside, outside


def test_the_sidecar_starts_with_kserves_command_line(rootfs):
    # KServe's LLMInferenceService renders this for its llm-d-routing-sidecar container.
    res = in_image(
        rootfs,
        [
            "/app/pd-sidecar",
            "--check-config",
            "--port=8000",
            "--vllm-port=8001",
            "--kv-connector=nixlv2",
            "--secure-proxy=true",
            "--cert-path=/var/run/kserve/tls",
            "--enable-tls=decoder",
            "--enable-tls=prefiller",
        ],
    )
    assert res.returncode == 0, res.stderr
    assert "decode_port: 8001," in res.stdout and "secure_proxy: true," in res.stdout


def test_every_binary_starts_from_the_image(rootfs):
    res = in_image(rootfs, ["/app/pd-router", "--check-config", "--decode=http://decode.llm.svc:8000"])
    assert res.returncode == 0, res.stderr
    for b in ["/app/kv-agent", "/app/kvbench"]:
        res = in_image(rootfs, [b, "--help"])
        assert res.returncode == 0, (b, res.stderr)


def test_nixl_from_the_image_moves_kv(rootfs, image):
    """kvbench over NIXL with the image's NIXL runtime: the libraries load and a transfer is
    byte-checked (two agents in one process, host memory)."""
    _, config = image
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    lib_dir = rootfs / env["TANDEM_NIXL_LIB_DIR"].lstrip("/")
    out = rootfs.parent / "kvbench.json"
    res = in_image(
        rootfs,
        ["/app/kvbench", "run", "--backend", "nixl", "--model", "layers=2,kv_heads=2,head_dim=64",
         "--num-blocks", "64", "--tokens", "256", "--reps", "2", "--warmup", "1",
         "--placement", "fragmented", "--json", str(out), "--png", "none"],
        env={"TANDEM_NIXL_LIB_DIR": str(lib_dir)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert rows and all(r["verified"] for r in rows), rows


def test_skopeo_reads_the_image():
    res = subprocess.run(
        ["skopeo", "inspect", "--config", f"oci:{LAYOUT}:{TAG}"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["config"]["Entrypoint"] == ["/app/pd-sidecar"]
