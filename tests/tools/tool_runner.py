"""Run the tools as a user would (subprocess, torchrun) or call their main() in-process."""
import importlib
import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, 'tools')


def tool_env(**extra):
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    env.pop('LOCAL_RANK', None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script, *args, timeout=300, env=None, cwd=REPO):
    """Run ``python tools/<script> args...``; returns the CompletedProcess (text output)."""
    cmd = [sys.executable, os.path.join(TOOLS, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env or tool_env(), cwd=cwd)


def run_torchrun(nproc, script, *args, timeout=300):
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc-per-node={nproc}',
           os.path.join(TOOLS, script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=tool_env(), cwd=REPO)


def load_tool(name):
    """Import tools/<name>.py under a private module name, or the shared helper module ``toolkit.<module>``
    itself (both import the ``toolkit`` package through sys.path, as the tools do when run as scripts)."""
    if TOOLS not in sys.path:
        sys.path.insert(0, TOOLS)
    if name.startswith('toolkit.'):
        return importlib.import_module(name)
    spec = importlib.util.spec_from_file_location(f'_vmz_tool_{name}', os.path.join(TOOLS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_ok(proc):
    assert proc.returncode == 0, f'exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}'
