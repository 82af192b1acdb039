"""A real one-node Slurm (slurmctld + slurmd + munged) on 127.0.0.1, state in a temp dir.

Started by tests/test_slurm.py; every daemon it starts is stopped again by PID. The node may
declare GPUs it does not have: their device files are copies of /dev/null, so a job that asks
for GPUs gets Slurm's GPU variables (SLURM_JOB_GPUS, CUDA_VISIBLE_DEVICES) on a CPU machine.

TmpFS is the cluster's own: srun's PMIx plugin makes each step a directory there named by user,
job and step (/tmp/spmix_appdir_0_1.0 by default), and job numbers restart at 1 in every
cluster, so one left in /tmp by an earlier cluster would make the same step fail to launch.
"""
import os
import shutil
import socket
import stat
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")


def find_binary(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_binaries():
    return [name for name in (*DAEMONS, *CLIENTS) if not find_binary(name)]


def _free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _read_pid(path, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(open(path).read().strip())
        except (OSError, ValueError):
            time.sleep(0.2)
    raise RuntimeError(f"{path}: daemon did not write its PID")


class SlurmCluster:
    def __init__(self, root, cpus, fake_gpus=0):
        self.root = root
        self.cpus = cpus
        self.fake_gpus = fake_gpus
        self.pids = {}
        self.conf = os.path.join(root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def _write_config(self):
        for sub in ("state", "spool", "log", "munge", "tmp"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        r = self.root
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20) // 2
        gres = ""
        if self.fake_gpus:
            null = os.stat("/dev/null").st_rdev
            for index in range(self.fake_gpus):
                os.mknod(os.path.join(r, f"fakegpu{index}"), 0o666 | stat.S_IFCHR, null)
            with open(os.path.join(r, "gres.conf"), "w") as conf:
                conf.write(f"NodeName=localhost Name=gpu File={r}/fakegpu[0-{self.fake_gpus - 1}]\n")
            gres = f" Gres=gpu:{self.fake_gpus}"
        with open(self.conf, "w") as conf:
            conf.write(f"""ClusterName=lm1btest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a step's credential lifetime, and how long Slurm holds a requeued job back (120 s
# by default: two minutes of each requeue test spent waiting).
AuthInfo=socket={r}/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
TmpFS={r}/tmp
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# The main scheduling pass every 2 s (default 60): a requeued job starts when its hold ends.
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=3600
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={memory_mb}{gres} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def start(self):
        self._write_config()
        r = self.root
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as handle:
            handle.write(os.urandom(1024))
        os.chmod(key, 0o400)
        subprocess.run([find_binary("munged"), "--force", f"--key-file={key}",
                        f"--socket={r}/munge/munge.socket", f"--pid-file={r}/munge/munged.pid",
                        f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"],
                       check=True, env=self.env)
        self.pids["munged"] = _read_pid(f"{r}/munge/munged.pid")
        subprocess.run([find_binary("slurmctld"), "-f", self.conf, "-i"], check=True, env=self.env)
        self.pids["slurmctld"] = _read_pid(f"{r}/slurmctld.pid")
        subprocess.run([find_binary("slurmd"), "-f", self.conf, "-N", "localhost"], check=True, env=self.env)
        self.pids["slurmd"] = _read_pid(f"{r}/slurmd.pid")
        self.wait_idle()

    def wait_idle(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s: '{state}'; see {self.root}/log")

    def run(self, name, *args, check=True, env_extra=None):
        return subprocess.run([find_binary(name), *args], env={**self.env, **(env_extra or {})},
                              capture_output=True, text=True, check=check, timeout=60)

    def job_field(self, job_id, field):
        out = self.run("scontrol", "show", "job", str(job_id), "-o").stdout
        for item in out.split():
            if item.startswith(field + "="):
                return item.split("=", 1)[1]
        return None

    def wait_for(self, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"),
                 timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_field(job_id, "JobState")
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {state} after {timeout}s")

    def stop(self):
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                os.kill(pid, 15)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, 9)
