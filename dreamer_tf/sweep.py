"""The paper's runs, tasks x seeds, one `dreamer.py` each; and their state.

  python -m dreamer_tf.sweep --tasks dmc20 --seeds 0-4 --root ./logdir \\
      --launcher local --workers 2 [any dreamer.py flag ...]
  python -m dreamer_tf.sweep --tasks dmc20 --seeds 0-4 --root ./logdir \\
      --launcher slurm --partition gpu --time 1440 [any dreamer.py flag ...]
  python -m dreamer_tf.sweep --status ./logdir    (or: ... sweep status DIR)

Each run is `python dreamer.py --logdir <root>/<task>/dreamer/<seed> --task
<task> --seed <seed> [flags]`, started in the repository's folder with its
stdout and stderr appended to `<logdir>/sweep.out` and `sweep.err`. Every
run's flags are checked with dreamer.py's own checks before anything starts.
--script runs another script in its place (e.g. a fork of dreamer.py) with
the same flags and exit statuses.
dreamer.py saves and exits 130 on SIGTERM; the sweep starts it with SIGUSR2
ignored (Slurm's signal before a time-out may reach every process of a job;
submitit catches it in the job's own process).

Launchers, each on an existing engine:
 local: `concurrent.futures`, --workers runs at once on this machine, until
   all have ended. With G GPUs (`nvidia-smi -L`, or --gpus), worker slot k
   runs on GPU k mod G alone (CUDA_VISIBLE_DEVICES). Ctrl-C or SIGTERM stops
   every run (each saves) and starts no more.
 slurm: one job array through submitit (`SlurmRun`, a Checkpointable): the
   command returns once it is submitted. On Slurm's SIGUSR2 before a time-out
   or a preemption, submitit calls `SlurmRun.checkpoint`, which stops
   dreamer.py (SIGTERM: it saves) and requeues the same run, which resumes
   from its logdir. A run that stops on its own (exit 1, 3, ...) raises with
   the last line of its stderr and is not requeued. `--cluster local` runs
   the same jobs through submitit's LocalExecutor (the same API) on this
   machine, all at once: it is how the Slurm path is tested.

A run's state comes from its logdir alone (`run_state`), so that `--status`
works while runs go on, on any host that sees the logdirs:
 running: `<logdir>/lock` names an owner and its flock is held (checked with
   a non-blocking shared flock on the file opened read-only, released at
   once; an empty lock file, which dreamer.py leaves when it ends, is never
   probed, so a run starting in an empty logdir is never raced). Works
   across hosts where the filesystem passes flock on (see `rundir.Lock`).
   Only a run taking over the stale lock of a killed run can, in the
   microseconds of a probe, find it taken: it then stops as running
   elsewhere, and the next rerun starts it.
 done: the last step of metrics.jsonl is at least --steps (of the sweep's
   plan, else of config.json).
 failed: `<logdir>/sweep.json` records an exit of its own (1, 3, ...) with
   the last line of its stderr. A rerun skips it unless --retry_failed.
 preempted: sweep.json records a stop by a signal (exit 130 or 143, or
   killed), or a requeue by submitit. A rerun resumes it.
 queued: sweep.json records a job submitted to Slurm, not yet started.
 starting: a launcher started it less than 2 minutes ago (TensorFlow loads).
 stopped: it began (config.json, episodes or a start record) and none of the
   above holds: killed with no exit recorded. A rerun resumes it.
 not started: none of these.
A rerun never puts two trainers in one logdir: it skips running runs, and
queued ones whose job Slurm still holds; a dreamer.py that still finds the
lock taken stops at once, and the run is reported as running elsewhere, not
as failed.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import math
import os
import pathlib
import queue
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import submitit

from dreamer_tf import interrupts, replay, rundir

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The 20 DeepMind Control tasks of the paper (figure 4 and table 1), the
# tasks of dreamer_tf/scores/dreamer.json.
DMC20 = tuple('dmc_' + name for name in (
    'acrobot_swingup', 'cartpole_balance', 'cartpole_balance_sparse',
    'cartpole_swingup', 'cartpole_swingup_sparse', 'cheetah_run',
    'cup_catch', 'finger_spin', 'finger_turn_easy', 'finger_turn_hard',
    'hopper_hop', 'hopper_stand', 'pendulum_swingup', 'quadruped_run',
    'quadruped_walk', 'reacher_easy', 'reacher_hard', 'walker_run',
    'walker_stand', 'walker_walk'))
TASK_LISTS = dict(dmc20=DMC20)

METHOD = 'dreamer'
RECORD = 'sweep.json'       # <logdir>/: the sweep's record of the last exit
PLAN = 'sweep_runs.json'    # <root>/: every run the sweeps asked for
OUT, ERR = 'sweep.out', 'sweep.err'
SET_BY_SWEEP = ('logdir', 'task', 'seed', 'mode')
ELSEWHERE = 'another dreamer.py trains in'
INTERRUPTED = (130, 143)    # dreamer.py saved and stopped on SIGINT/SIGTERM
STARTING = 120              # seconds a start record counts as 'starting'
STOP_WAIT = 75              # seconds dreamer.py gets to save on a requeue
# Slurm states of a job that still holds or will hold its run.
SLURM_ACTIVE = ('PENDING', 'RUNNING', 'REQUEUED', 'CONFIGURING',
                'COMPLETING', 'SUSPENDED', 'RESIZING', 'REQUEUE_HOLD',
                'REQUEUE_FED', 'SIGNALING', 'STAGE_OUT')


class SweepError(ValueError):
  """Bad input to the sweep; the message is one line."""


@dataclasses.dataclass(frozen=True)
class Spec:
  """One run of a sweep: dreamer.py's flags besides --logdir/--task/--seed,
  and the --steps they give."""
  task: str
  seed: int
  logdir: str
  flags: tuple
  steps: int
  script: str = 'dreamer.py'  # --script: run from the repository's folder.

  @property
  def name(self):
    return f'{self.task} seed {self.seed}'

  def command(self):
    return [sys.executable, self.script, '--logdir', self.logdir, '--task',
            self.task, '--seed', str(self.seed), *self.flags]


# ------------------------------------------------------------------ the plan

def parse_tasks(items):
  """--tasks values (each a task, a comma-separated list or a list name such
  as dmc20) -> task names, in order, without repeats."""
  tasks = []
  for item in items:
    for name in filter(None, item.split(',')):
      if name in TASK_LISTS:
        tasks += TASK_LISTS[name]
      elif re.fullmatch(r'(dmc|atari)_[A-Za-z0-9_]+', name):
        tasks.append(name)
      else:
        raise SweepError(
            f'--tasks: {name!r} is neither a task (dmc_<domain>_<task> or '
            f'atari_<game>) nor a list ({", ".join(TASK_LISTS)}).')
  if not tasks:
    raise SweepError('--tasks: no task given.')
  return list(dict.fromkeys(tasks))


def parse_seeds(text):
  """'0-4', '0,2,7' or '1-3,8' -> [ints], in order, without repeats."""
  seeds = []
  for part in text.split(','):
    match = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', part)
    if not match:
      raise SweepError(f'--seeds {text!r}: expected seeds like 0-4, 0,2,7 or '
                       '1-3,8 (integers of at least 0).')
    low = int(match.group(1))
    high = int(match.group(2)) if match.group(2) is not None else low
    if high < low:
      raise SweepError(f'--seeds {text!r}: the range {part.strip()} is '
                       'empty (write it low-high).')
    seeds += range(low, high + 1)
  return list(dict.fromkeys(seeds))


def _dreamer():
  """The dreamer module (flags and their checks; imports no TensorFlow)."""
  if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
  import dreamer
  return dreamer


def plan(tasks, seeds, root, flags, script='dreamer.py'):
  """The runs of tasks x seeds under root, each checked by dreamer.py's own
  flag checks; raises SweepError naming the first problem. Each run starts
  `script` (relative to the repository's folder) with dreamer.py's flags."""
  for token in flags:
    name = token[2:].split('=')[0] if token.startswith('--') else None
    if name in SET_BY_SWEEP:
      raise SweepError(f'--{name} is set by the sweep for each run: leave '
                       'it out (--root, --tasks and --seeds choose them).')
  dreamer = _dreamer()
  specs = []
  for task in tasks:
    for seed in seeds:
      logdir = pathlib.Path(root) / task / METHOD / str(seed)
      spec = Spec(task, seed, str(logdir), tuple(flags), 0, script)
      try:
        config = dreamer.parse_args(spec.command()[2:])
        dreamer.check_config(config)
      except (ValueError, RuntimeError) as error:
        raise SweepError(f'dreamer.py would refuse {spec.name}: '
                         f'{error}') from None
      specs.append(dataclasses.replace(spec, steps=int(config.steps)))
  return specs


def store_plan(root, specs, command):
  """Adds the runs to `<root>/sweep_runs.json`, which --status lists."""
  path = pathlib.Path(root) / PLAN
  content = _read_json(path) or {}
  runs = content.get('runs', {})
  for spec in specs:
    runs[f'{spec.task}/{spec.seed}'] = dict(
        task=spec.task, seed=spec.seed, steps=spec.steps,
        flags=list(spec.flags))
  sweeps = content.get('sweeps', [])[-49:]
  sweeps.append(dict(time=_now(), command=command))
  _write_json(path, dict(runs=runs, sweeps=sweeps))


# --------------------------------------------------------- state of a run

@dataclasses.dataclass
class State:
  state: str            # see the module doc
  detail: str = ''      # the owner, the reason, the job
  step: int = None      # environment steps done
  steps: int = None     # of --steps
  ret: float = None     # last test return
  age: float = None     # seconds since the last write in the logdir
  record: dict = None   # sweep.json


def run_state(logdir, steps=None, now=None):
  """The state of the run in `logdir` (module doc), from its files only.
  `steps`: the --steps it is planned for (else config.json's)."""
  logdir = pathlib.Path(logdir)
  now = time.time() if now is None else now
  try:
    config = rundir.read_config(logdir) or {}
  except rundir.LogdirError:
    config = {}
  steps = steps or config.get('steps')
  step, ret = read_progress(logdir / 'metrics.jsonl')
  if step is None and (logdir / 'episodes').is_dir():
    step = replay.count_steps(logdir / 'episodes',
                              config.get('action_repeat', 2)) or None
  record = _read_json(logdir / RECORD)
  state = State('not started', step=step, steps=steps, ret=ret,
                age=_age(logdir, now), record=record)
  owner = rundir.lock_owner(logdir)
  kind = (record or {}).get('state')
  if owner:
    state.state, state.detail = 'running', owner
  elif step is not None and steps and step >= steps:
    state.state = 'done'
  elif kind in ('failed', 'preempted'):
    state.state, state.detail = kind, record.get('reason', '')
  elif kind == 'queued':
    state.state, state.detail = 'queued', _job_text(record)
  elif kind == 'started' and now - record.get('unix', 0) < STARTING:
    state.state, state.detail = 'starting', _job_text(record)
  elif record or config or step is not None:
    state.state = 'stopped'
    state.detail = 'no exit recorded (killed?); a rerun resumes it'
  return state


def read_progress(path, chunk=1 << 16):
  """(last step, last test return) of a metrics.jsonl, either None when
  absent, read from the end of the file only as far as needed."""
  step = ret = None
  try:
    handle = open(path, 'rb')
  except OSError:
    return None, None
  with handle:
    position = handle.seek(0, os.SEEK_END)
    carry = b''
    while position > 0 and (step is None or ret is None):
      size = min(chunk, position)
      position -= size
      handle.seek(position)
      lines = (handle.read(size) + carry).split(b'\n')
      carry = lines.pop(0) if position > 0 else b''
      for line in reversed(lines):
        record = _parse_metrics_line(line)
        if record is None:
          continue
        if step is None:
          step = int(record['step'])
        value = record.get('test/return')
        if ret is None and _finite(value):
          ret = float(value)
  return step, ret


def _parse_metrics_line(line):
  try:
    record = json.loads(line)
  except ValueError:
    return None
  if isinstance(record, dict) and _finite(record.get('step')):
    return record
  return None


def _finite(value):
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _age(logdir, now):
  """Seconds since anything in the logdir was last written, or None."""
  times = []
  for name in ('metrics.jsonl', OUT, ERR, RECORD, 'config.json',
               'episodes', 'checkpoints', 'lock'):
    try:
      times.append((logdir / name).stat().st_mtime)
    except OSError:
      pass
  return max(0.0, now - max(times)) if times else None


def _job_text(record):
  job = record.get('job')
  if not job:
    return f'on {record.get("host", "?")}'
  where = 'Slurm' if record.get('cluster') == 'slurm' else 'local'
  return f'{where} job {job}'


# ------------------------------------------------------------ one process

@dataclasses.dataclass
class Outcome:
  kind: str        # done, failed, preempted, elsewhere, skipped
  text: str        # one line
  status: int = None


def start(spec, env, job=None, cluster=None):
  """Starts dreamer.py for `spec`; returns (process, offset of this start in
  sweep.err). Writes a start record and a header line in sweep.out."""
  logdir = pathlib.Path(spec.logdir)
  logdir.mkdir(parents=True, exist_ok=True)
  command = spec.command()
  write_record(logdir, state='started', job=job, cluster=cluster)
  with open(logdir / OUT, 'a') as out, open(logdir / ERR, 'a') as err:
    offset = err.tell()
    out.write(f'--- sweep: {_now()} on {socket.gethostname()}'
              f'{f", job {job}" if job else ""}: {shlex.join(command)}\n')
    out.flush()
    # The shell sets SIGUSR2 to ignored, which exec keeps: Slurm may send
    # its warning signal to every process of the job.
    process = subprocess.Popen(
        ['/bin/sh', '-c', 'trap "" USR2; exec "$@"', 'sh', *command],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
        env=dict(env, PYTHONUNBUFFERED='1'), start_new_session=True)
  return process, offset


def finish(spec, status, offset, job=None, cluster=None):
  """Classifies dreamer.py's exit `status` and records it in sweep.json
  (except for a run that found its logdir taken)."""
  last = last_error_line(pathlib.Path(spec.logdir) / ERR, offset)
  if status == 0:
    kind, reason = 'done', 'exit 0'
  elif status == 1 and ELSEWHERE in last:
    return Outcome('elsewhere', f'running elsewhere: {last}', status)
  elif status in INTERRUPTED or status < 0:
    how = (f'killed by {_signal_name(-status)}' if status < 0 else
           f'exit {status}: stopped by a signal, saved')
    kind, reason = 'preempted', f'{how}; a rerun resumes it'
  else:
    kind, reason = 'failed', f'exit {status}: {last}'
  write_record(spec.logdir, state=kind, status=status, reason=reason,
               job=job, cluster=cluster)
  return Outcome(kind, reason, status)


def _signal_name(number):
  try:
    return signal.Signals(number).name
  except ValueError:
    return f'signal {number}'


def last_error_line(path, offset=0):
  """The last `dreamer.py: error:` line written to `path` after `offset`,
  else its last line."""
  try:
    with open(path, 'rb') as handle:
      handle.seek(offset)
      text = handle.read().decode('utf-8', 'replace')
  except OSError:
    return '(no stderr)'
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  errors = [line for line in lines if line.startswith('dreamer.py: error:')]
  line = (errors or lines or ['(nothing on stderr)'])[-1]
  return line if len(line) <= 400 else line[:397] + '...'


def write_record(logdir, **fields):
  fields = dict(fields, time=_now(), unix=time.time(),
                host=socket.gethostname())
  _write_json(pathlib.Path(logdir) / RECORD, fields)


# ----------------------------------------------------------- local launcher

def detect_gpus(text):
  """--gpus: 'auto' (the GPUs `nvidia-smi -L` lists), 'none', a count or a
  list like 0,2 -> the CUDA_VISIBLE_DEVICES values to deal out."""
  if text == 'none':
    return []
  if text == 'auto':
    if not shutil.which('nvidia-smi'):
      return []
    try:
      listed = subprocess.run(['nvidia-smi', '-L'], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
      return []
    return [str(i) for i, line in enumerate(listed.splitlines())
            if line.startswith('GPU ')]
  if re.fullmatch(r'\d+', text):
    return [str(i) for i in range(int(text))]
  if re.fullmatch(r'\d+(,\d+)*', text):
    return text.split(',')
  raise SweepError(f'--gpus {text!r}: expected auto, none, a count or a '
                   'list of GPU numbers like 0,2.')


def launch_local(specs, workers, gpus, say):
  """Runs `specs`, `workers` at once; returns their outcomes and whether
  a SIGINT or SIGTERM stopped the sweep."""
  slots = queue.Queue()
  for slot in range(workers):
    slots.put(slot)
  guard = threading.Lock()
  stopping = threading.Event()
  live = {}

  def one(spec):
    slot = slots.get()
    try:
      env = dict(os.environ)
      gpu = gpus[slot % len(gpus)] if gpus else None
      if gpu is not None:
        env['CUDA_VISIBLE_DEVICES'] = gpu
      with guard:
        if stopping.is_set():
          return Outcome('skipped', 'not started: the sweep was stopped')
        try:
          process, offset = start(spec, env)
        except OSError as error:  # E.g. the logdir cannot be written.
          say(f'failed {spec.name}: cannot start it: {error}')
          return Outcome('failed', f'cannot start it: {error}')
        live[spec] = process
      say(f'started {spec.name} (pid {process.pid}'
          f'{f", GPU {gpu}" if gpu is not None else ""}): '
          f'{pathlib.Path(spec.logdir) / OUT}')
      status = process.wait()
      with guard:
        live.pop(spec)
      outcome = finish(spec, status, offset)
      say(f'{outcome.kind} {spec.name}: {outcome.text}')
      return outcome
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = [pool.submit(one, spec) for spec in specs]
    interrupted = False
    try:
      while concurrent.futures.wait(futures, timeout=1).not_done:
        interrupts.check()
    except KeyboardInterrupt:
      interrupted = True
      for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # Each run gets one SIGTERM.
      with guard:
        stopping.set()
        say(f'Stopping: SIGTERM to {len(live)} run(s); each saves a '
            'checkpoint. Rerun the same command to resume.')
        for process in live.values():
          process.send_signal(signal.SIGTERM)
      concurrent.futures.wait(futures)
  return [future.result() for future in futures], interrupted


# ----------------------------------------------------------- Slurm launcher

class SlurmRun(submitit.helpers.Checkpointable):
  """One run as a submitit job: runs dreamer.py to its end. Requeued by
  submitit through `checkpoint` on Slurm's time-out or preemption signal;
  raises (and is not requeued) when dreamer.py stops for its own reason."""

  def __init__(self, spec, preempt_wait=60.0, cluster='slurm'):
    self.spec, self.preempt_wait, self.cluster = spec, preempt_wait, cluster
    self._process = self._status = None

  def __getstate__(self):  # No process in the pickle of a requeue.
    return dict(spec=self.spec, preempt_wait=self.preempt_wait,
                cluster=self.cluster)

  def __setstate__(self, state):
    self.__init__(**state)

  def __call__(self):
    spec = self.spec
    state = run_state(spec.logdir, spec.steps)
    if state.state == 'done':  # E.g. requeued as it ended.
      if (state.record or {}).get('state') != 'done':
        write_record(spec.logdir, state='done', reason='done already',
                     job=_job_id(), cluster=self.cluster)
      return f'{spec.name}: done already'
    if state.state == 'running':
      return f'{spec.name}: running elsewhere ({state.detail})'
    job = _job_id()
    process, offset = start(spec, os.environ, job, self.cluster)
    self._process = process
    threading.Thread(target=self._wait, daemon=True).start()
    try:
      while self._status is None:
        time.sleep(0.5)
    except KeyboardInterrupt:  # A cancel (the LocalExecutor sends SIGINT).
      self._stop()
      raise
    outcome = finish(spec, self._status, offset, job, self.cluster)
    if outcome.kind in ('done', 'elsewhere'):
      return f'{spec.name}: {outcome.text}'
    if outcome.kind == 'preempted':
      # Slurm's SIGTERM reached dreamer.py first; its requeue signal
      # (SIGUSR2, then `checkpoint`) may follow: wait for it.
      deadline = time.time() + self.preempt_wait
      while time.time() < deadline:
        time.sleep(0.5)
    raise RuntimeError(f'{spec.name}: {outcome.kind}: {outcome.text}')

  def _wait(self):
    self._status = self._process.wait()

  def _stop(self):
    """SIGTERM to dreamer.py (it saves, then exits 130); waits for it."""
    if self._process is None or self._status is not None:
      return
    try:
      os.kill(self._process.pid, signal.SIGTERM)
    except ProcessLookupError:
      return
    deadline = time.time() + STOP_WAIT
    while self._status is None and time.time() < deadline:
      time.sleep(0.2)

  def checkpoint(self, *args, **kwargs):
    """Called by submitit on Slurm's signal before a time-out or at a
    preemption: stops dreamer.py, which saves, and requeues this run."""
    self._stop()
    if self._process is not None and self._status != 0:
      write_record(
          self.spec.logdir, state='preempted', status=self._status,
          job=_job_id(), cluster=self.cluster, requeued=True,
          reason='stopped by a time-out or preemption signal and requeued '
                 'by submitit; it resumes when the job starts again')
    return submitit.helpers.DelayedSubmission(
        SlurmRun(self.spec, self.preempt_wait, self.cluster))


def _job_id():
  try:
    return submitit.JobEnvironment().job_id
  except Exception:  # Not inside a submitit job (e.g. called directly).
    return None


def job_active(record, root):
  """Whether the job in a run's record still holds or will hold the run:
  for Slurm, by sacct through submitit (an unknown state counts as ended);
  for the local executor, by its controller's pid on this host."""
  job = (record or {}).get('job')
  if not job or not (record.get('state') in ('queued', 'started') or
                     record.get('requeued')):
    return False
  if record.get('cluster') == 'local':
    import psutil
    if record.get('host') != socket.gethostname():
      return False
    try:  # The job's controller, not another process with its pid.
      command = psutil.Process(int(job)).cmdline()
    except (psutil.Error, ValueError):
      return False
    return 'submitit.local._local' in command and str(root) in ' '.join(
        command)
  try:
    state = submitit.SlurmJob(folder=_submitit_folder(root),
                              job_id=str(job)).state
  except Exception:
    return False
  return state.split()[0].upper() in SLURM_ACTIVE


@contextlib.contextmanager
def _stdio_to_devnull():
  """File descriptors 0, 1 and 2 on /dev/null within the block (so that
  processes started there do not inherit them)."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(fd) for fd in (0, 1, 2)]
  null = os.open(os.devnull, os.O_RDWR)
  try:
    for fd in (0, 1, 2):
      os.dup2(null, fd)
    yield
  finally:
    for fd, copy in zip((0, 1, 2), saved):
      os.dup2(copy, fd)
      os.close(copy)
    os.close(null)


def _submitit_folder(root):
  return pathlib.Path(root) / '.submitit' / '%j'


def launch_slurm(specs, args, root, say):
  """Submits `specs` as one job array; returns the submitted jobs."""
  # The jobs unpickle SlurmRun: they must import dreamer_tf from anywhere.
  paths = [str(ROOT)] + os.environ.get('PYTHONPATH', '').split(os.pathsep)
  os.environ['PYTHONPATH'] = os.pathsep.join(dict.fromkeys(filter(None, paths)))
  executor = submitit.AutoExecutor(
      folder=_submitit_folder(root), cluster=args.cluster,
      slurm_max_num_timeout=args.max_timeouts,
      local_max_num_timeout=args.max_timeouts)
  executor.update_parameters(
      name='dreamer', timeout_min=args.time, gpus_per_node=args.gpus_per_run,
      cpus_per_task=args.cpus_per_run, mem_gb=args.mem_gb,
      slurm_partition=args.partition,
      slurm_array_parallelism=args.max_running or len(specs))
  # A job may start (and end) before submit_array returns: the queued record
  # is written only where the run's record is still this sweep's.
  tokens = {}
  for spec in specs:
    pathlib.Path(spec.logdir).mkdir(parents=True, exist_ok=True)
    tokens[spec] = uuid.uuid4().hex
    write_record(spec.logdir, state='queued', token=tokens[spec],
                 cluster=args.cluster)
  runs = [SlurmRun(spec, args.preempt_wait, args.cluster) for spec in specs]
  if args.cluster == 'local':
    # Its job controllers outlive this command: they must not hold its
    # stdout and stderr open (a pipe reading them would wait for the jobs).
    with _stdio_to_devnull():
      jobs = executor.submit_array(runs)
  else:
    jobs = executor.submit_array(runs)
  for spec, job in zip(specs, jobs):
    record = _read_json(pathlib.Path(spec.logdir) / RECORD) or {}
    if record.get('token') == tokens[spec]:
      write_record(spec.logdir, state='queued', job=job.job_id,
                   cluster=args.cluster)
    say(f'submitted {spec.name}: job {job.job_id}')
  return jobs


# ------------------------------------------------------------------ status

def status_table(root):
  """The table of every run under root (planned by a sweep, or found as
  `<root>/<task>/dreamer/<seed>`), and a summary line."""
  root = pathlib.Path(root)
  planned = (_read_json(root / PLAN) or {}).get('runs', {})
  runs = {(r['task'], str(r['seed'])): r.get('steps')
          for r in planned.values()}
  for logdir in root.glob(f'*/{METHOD}/*'):
    if logdir.is_dir() and any((logdir / name).exists() for name in
                               ('config.json', RECORD, 'metrics.jsonl')):
      task = logdir.parts[-3]
      runs.setdefault((task, logdir.name), None)
  if not runs:
    return f'No runs under {root}.'
  now = time.time()
  rows = [('task', 'seed', 'steps', 'return', 'last write', 'state')]
  counts = {}
  for (task, seed), steps in sorted(runs.items(), key=_run_key):
    state = run_state(root / task / METHOD / seed, steps, now)
    counts[state.state] = counts.get(state.state, 0) + 1
    done = '-' if state.step is None else str(state.step)
    rows.append((
        task, seed, f'{done}/{state.steps or "?"}',
        '-' if state.ret is None else f'{state.ret:.1f}',
        '-' if state.age is None else f'{_duration(state.age)} ago',
        state.state + (f': {state.detail}' if state.detail else '')))
  widths = [max(len(row[i]) for row in rows) for i in range(5)]
  lines = ['  '.join([row[0].ljust(widths[0]), row[1].rjust(widths[1]),
                      row[2].rjust(widths[2]), row[3].rjust(widths[3]),
                      row[4].rjust(widths[4]), row[5]]).rstrip()
           for row in rows]
  order = ('done', 'running', 'starting', 'queued', 'preempted', 'stopped',
           'failed', 'not started')
  lines.append(f'{len(runs)} runs: ' + ', '.join(
      f'{counts[k]} {k}' for k in order if k in counts) + '.')
  return '\n'.join(lines)


def _run_key(item):
  (task, seed), _ = item
  return (task, (0, int(seed), '') if seed.isdigit() else (1, 0, seed))


def _duration(seconds):
  for unit, size in (('d', 86400), ('h', 3600), ('m', 60)):
    if seconds >= size:
      return f'{seconds / size:.0f}{unit}'
  return f'{seconds:.0f}s'


# -------------------------------------------------------------------- main

def parser():
  p = argparse.ArgumentParser(
      prog='python -m dreamer_tf.sweep', allow_abbrev=False,
      description='Runs dreamer.py for tasks x seeds; any other flag goes '
      'to every run. Rerunning the same command skips finished runs, '
      'resumes unfinished ones and leaves running ones alone.',
      epilog='State of every run: python -m dreamer_tf.sweep --status ROOT')
  p.add_argument('--tasks', nargs='+', default=None, help='Tasks: names '
                 '(dmc_<domain>_<task>, atari_<game>), comma-separated or '
                 'not, or dmc20, the paper\'s 20.')
  p.add_argument('--seeds', default='0', help='Seeds, e.g. 0-4 or 0,2,7 '
                 '(default: 0).')
  p.add_argument('--root', default='./logdir', help='Runs go to '
                 'ROOT/<task>/dreamer/<seed> (default: ./logdir).')
  p.add_argument('--launcher', choices=('local', 'slurm'), default='local')
  p.add_argument('--retry_failed', action='store_true', help='Start runs '
                 'whose last exit was a failure again (skipped otherwise).')
  p.add_argument('--dry_run', action='store_true', help='Print what would '
                 'start; start nothing.')
  p.add_argument('--script', default='dreamer.py', help='The script each '
                 'run starts, with dreamer.py\'s flags and exit statuses '
                 '(a path, relative to the repository\'s folder; default: '
                 'dreamer.py).')
  p.add_argument('--status', metavar='ROOT', help='Print the table of every '
                 'run under ROOT and exit.')
  local = p.add_argument_group('--launcher local')
  local.add_argument('--workers', type=int, default=1, help='Runs at once '
                     '(default: 1).')
  local.add_argument('--gpus', default='auto', help='GPUs to deal out, one '
                     'per worker slot, round-robin: auto (nvidia-smi -L), '
                     'none, a count or a list like 0,2 (default: auto).')
  slurm = p.add_argument_group('--launcher slurm (through submitit)')
  slurm.add_argument('--partition', default=None, help='Slurm partition.')
  slurm.add_argument('--time', type=int, default=1440, help='Minutes per '
                     'job; a run that needs more is requeued and resumes '
                     '(default: 1440).')
  slurm.add_argument('--gpus_per_run', type=int, default=1)
  slurm.add_argument('--cpus_per_run', type=int, default=8)
  slurm.add_argument('--mem_gb', type=float, default=None, help='Memory per '
                     'run (default: the partition\'s).')
  slurm.add_argument('--max_running', type=int, default=0, help='Jobs of '
                     'the array running at once (default: all).')
  slurm.add_argument('--max_timeouts', type=int, default=10, help='Requeues '
                     'after a time-out before a run is given up (default: '
                     '10; preemptions do not count).')
  slurm.add_argument('--preempt_wait', type=float, default=60.0,
                     help='Seconds a job waits for Slurm\'s requeue signal '
                     'after dreamer.py stopped on SIGTERM (default: 60).')
  slurm.add_argument('--cluster', choices=('slurm', 'local'), default='slurm',
                     help='local: submitit\'s LocalExecutor, the same jobs '
                     'on this machine, all at once (to test the Slurm path).')
  return p


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ['status']:
    argv = ['--status', *argv[1:]]
  try:
    args, flags = parser().parse_known_args(argv)
    if args.status:
      if not pathlib.Path(args.status).is_dir():
        raise SweepError(f'--status {args.status}: no such folder.')
      try:
        print(status_table(args.status), flush=True)
      except BrokenPipeError:  # E.g. piped into head.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
      return 0
    return sweep(args, flags)
  except SweepError as error:
    sys.exit(f'sweep: error: {error}')


def sweep(args, flags):
  if args.tasks is None:
    raise SweepError('--tasks is required, e.g. --tasks dmc20 or --tasks '
                     'dmc_walker_walk,dmc_cheetah_run.')
  if args.workers < 1:
    raise SweepError(f'--workers {args.workers} must be at least 1.')
  if (args.launcher == 'slurm' and args.cluster == 'slurm' and
      not args.dry_run and not shutil.which('sbatch')):
    raise SweepError('--launcher slurm needs Slurm\'s sbatch on this host '
                     '(run it on a login node), or --launcher local.')
  gpus = detect_gpus(args.gpus) if args.launcher == 'local' else []
  root = pathlib.Path(args.root).expanduser().absolute()
  script = ROOT / args.script
  if not script.is_file():
    raise SweepError(f'--script {args.script}: no such file in {ROOT}.')
  specs = plan(parse_tasks(args.tasks), parse_seeds(args.seeds), root, flags,
               args.script)
  say = _say
  launch, notes, failed_before = [], [], []
  for spec in specs:
    state = run_state(spec.logdir, spec.steps)
    if state.state == 'done':
      notes.append(f'done {spec.name}: skipped')
    elif state.state in ('running', 'starting'):
      notes.append(f'running elsewhere {spec.name} ({state.detail}): skipped')
    elif state.state == 'failed' and not args.retry_failed:
      failed_before.append(f'{spec.name}: {state.detail}')
    elif job_active(state.record, root):
      notes.append(f'queued {spec.name} ({_job_text(state.record)}): '
                   'skipped')
    else:
      launch.append(spec)
  for note in notes:
    say(note)
  for line in failed_before:
    say(f'failed earlier {line}')
  if failed_before:
    say(f'{len(failed_before)} failed run(s) not retried: fix the cause, '
        'then add --retry_failed.')
  verb = dict(local='start', slurm='submit')[args.launcher]
  verb = f'would {verb}' if args.dry_run else dict(
      start='starting', submit='submitting')[verb]
  say(f'{len(specs)} runs: {len(specs) - len(launch)} skipped, {verb} '
      f'{len(launch)} ({args.launcher}' + (
          f', {args.workers} at once' if args.launcher == 'local' else '') +
      (f', GPUs {",".join(gpus)}' if gpus else '') + ').')
  if args.dry_run:
    for spec in launch:
      print(shlex.join(spec.command()))
    return 0
  if not launch:
    return 1 if failed_before else 0
  root.mkdir(parents=True, exist_ok=True)
  store_plan(root, specs, shlex.join(['python', '-m', 'dreamer_tf.sweep',
                                      *sys.argv[1:]]))
  if args.launcher == 'slurm':
    launch_slurm(launch, args, root, say)
    say(f'Submitted {len(launch)} job(s) (submitit logs in '
        f'{root / ".submitit"}). Follow them with: python -m '
        f'dreamer_tf.sweep --status {args.root}')
    return 1 if failed_before else 0
  with interrupts.deferred():  # Ctrl-C or SIGTERM: launch_local stops.
    outcomes, interrupted = launch_local(launch, args.workers, gpus, say)
  kinds = [o.kind for o in outcomes]
  say('Ended: ' + ', '.join(f'{kinds.count(k)} {k}' for k in dict.fromkeys(
      kinds)) + '. State of every run: python -m dreamer_tf.sweep --status '
      f'{args.root}')
  if interrupted:
    return 130
  return 1 if 'failed' in kinds or failed_before else 0


def _say(text):
  print(f'[{datetime.datetime.now():%H:%M:%S}] {text}', flush=True)


def _now():
  return datetime.datetime.now().isoformat(timespec='seconds')


def _read_json(path):
  try:
    return json.loads(pathlib.Path(path).read_text())
  except (OSError, ValueError):
    return None


def _write_json(path, content):
  rundir.write_atomic(path, json.dumps(content, indent=1) + '\n')


if __name__ == '__main__':
  # Through the importable module, so that submitit pickles SlurmRun by
  # reference (a class of __main__ would be pickled by value).
  from dreamer_tf import sweep as module
  sys.exit(module.main())
