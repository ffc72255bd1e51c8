"""python -m dreamer_tf.sweep (issue 20): tasks x seeds as dreamer.py runs,
through submitit (its LocalExecutor: the API of the Slurm one) and through
the local pool, with a preemption, a failure and reruns; and --status.

The two sweeps start tests/stand_in_dreamer.py (dreamer.py's main with a
fake model and environments) with --preset debug --steps 600 (prefill, one
evaluation, one training occasion); a real dreamer.py run's state is read
from the session's trained run; the other tests are pure Python."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest

from dreamer_tf import replay, rundir, sweep
from runs import ROOT

TASKS = 'dmc_cartpole_balance,dmc_pendulum_swingup'
FLAGS = ('--preset', 'debug', '--steps', '600')
HEADER = ['task', 'seed', 'steps', 'return', 'last write', 'state']
# The sweeps' runs: dreamer.py's own main, flags, checks, lock, signals and
# loop, with a fake model and fake environments (no TensorFlow graph to
# trace, no rendering). test_a_real_run_reads_as_done checks the state
# read from a real dreamer.py run.
STAND_IN = 'tests/stand_in_dreamer.py'


def sweep_command(root, *options, tasks=TASKS, seeds='0-1'):
  return [sys.executable, '-m', 'dreamer_tf.sweep', '--root', str(root),
          '--tasks', tasks, '--seeds', seeds, *options, *FLAGS]


def run_sweep(root, *options, timeout=600, **runs):
  return subprocess.run(sweep_command(root, *options, **runs), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def status(root):
  """--status ROOT parsed: {(task, seed): {steps, return, ...}}, and the
  table as printed."""
  table = subprocess.run(
      [sys.executable, '-m', 'dreamer_tf.sweep', '--status', str(root)],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  lines = table.splitlines()
  assert re.split(r'\s{2,}', lines[0].strip()) == HEADER, table
  assert re.fullmatch(r'\d+ runs: .*\.', lines[-1]), table
  rows = {}
  for line in lines[1:-1]:
    task, seed, steps, ret, age, state = re.split(
        r'\s{2,}', line.strip(), maxsplit=5)
    rows[task, int(seed)] = dict(steps=steps, ret=ret, age=age, state=state)
  print(table)  # The tables of each stage, with pytest -s.
  return rows, table


def logdir(root, task, seed):
  return root / task / 'dreamer' / str(seed)


def record(path):
  try:
    return json.loads((path / 'sweep.json').read_text())
  except (OSError, ValueError):
    return {}


def wait_until(predicate, what, timeout=300):
  deadline = time.time() + timeout
  while not predicate():
    assert time.time() < deadline, f'timed out waiting for {what}'
    time.sleep(0.5)


def trainer_pid(path):
  """The pid of dreamer.py in `path`, once it has stored an episode (so
  that its SIGTERM handler is in place)."""
  wait_until(lambda: list((path / 'episodes').glob('*.npz')) and
             rundir.lock_owner(path), f'an episode in {path}')
  return json.loads((path / 'lock').read_text())['pid']


def snapshot(path):
  return dict(
      metrics=(path / 'metrics.jsonl').read_text().splitlines()
      if (path / 'metrics.jsonl').exists() else [],
      episodes={p.name: p.stat().st_mtime
                for p in (path / 'episodes').glob('*.npz')})


def starts(path):
  return (path / 'sweep.out').read_text().count('--- sweep: ')


def check_resumed(path, before, runs=2):
  """The run in `path` was stopped once and resumed where it stopped:
  the step did not restart, no metrics line or episode was written twice."""
  out = (path / 'sweep.out').read_text()
  assert starts(path) == runs, out
  stopped = int(re.search(r'Interrupted at step (\d+)', out).group(1))
  resumed = re.search(r'(?:Resumed from \S+ at step|Continuing at step) '
                      r'(\d+)', out)
  assert resumed and int(resumed.group(1)) == stopped, out
  lines = (path / 'metrics.jsonl').read_text().splitlines()
  assert lines[:len(before['metrics'])] == before['metrics']
  records = [json.loads(line) for line in lines]
  steps = [r['step'] for r in records]
  assert steps == sorted(steps) and steps[-1] == 600
  keys = [(r['step'], k) for r in records for k in r if k != 'step']
  assert len(keys) == len(set(keys)), 'a metric was written twice'
  episodes = {p.name: p.stat().st_mtime
              for p in (path / 'episodes').glob('*.npz')}
  assert before['episodes'].items() <= episodes.items()
  assert replay.count_steps(path / 'episodes', 2) <= 600


@pytest.fixture
def cleanup():
  """Kills what a failed test may leave running: dreamer.py holding a lock
  under the roots given, and the submitit jobs of their records."""
  roots = []
  yield roots.append
  for root in roots:
    for path in root.glob('*/dreamer/*'):
      pids = []
      if rundir.lock_owner(path):
        pids.append(json.loads((path / 'lock').read_text())['pid'])
      if record(path).get('cluster') == 'local' and record(path).get('job'):
        pids.append(int(record(path)['job']))
      for pid in pids:
        try:
          process = psutil.Process(pid)
          if str(root) not in ' '.join(process.cmdline()):
            continue  # Not ours: the pid was reused.
          for child in process.children(recursive=True):
            child.kill()
          process.kill()
        except psutil.Error:
          pass


@pytest.mark.slow
def test_submitit_sweep_resumes_a_preempted_run_and_skips_finished_ones(
    tmp_path, cleanup):
  """Through submitit's LocalExecutor: 3 seeds of a task (the expansion of
  tasks x seeds is tested below); seed 0 is preempted the way Slurm does it
  (SIGTERM to its processes), seed 1 gets the signal Slurm sends before a
  time-out (SIGUSR2 to the job), which submitit turns into a requeue, and
  seed 2 runs to its end; the same command again resumes seed 0 alone.
  The runs are the stand-in (STAND_IN)."""
  root = tmp_path / 'logdir'
  cleanup(root)
  task = 'dmc_cartpole_balance'
  options = ('--launcher', 'slurm', '--cluster', 'local', '--preempt_wait',
             '1', '--script', STAND_IN)
  runs = dict(tasks=task, seeds='0-2')
  result = run_sweep(root, *options, timeout=120, **runs)
  assert result.returncode == 0, result.stderr
  assert result.stdout.count('submitted ') == 3, result.stdout
  rows, _ = status(root)
  assert len(rows) == 3
  assert {r['state'].split(':')[0] for r in rows.values()} <= {
      'queued', 'starting', 'running'}
  preempted = logdir(root, task, 0)
  requeued = logdir(root, task, 1)
  finished = logdir(root, task, 2)
  os.kill(trainer_pid(preempted), signal.SIGTERM)
  psutil.Process(trainer_pid(requeued)).parent().send_signal(signal.SIGUSR2)
  wait_until(lambda: record(preempted).get('state') == 'preempted',
             'the preempted record')
  rows, _ = status(root)
  assert rows[task, 0]['state'].startswith(
      'preempted: exit 130: stopped by a signal, saved; a rerun resumes it')
  wait_until(lambda: all(record(p).get('state') == 'done'
                         for p in (finished, requeued)), 'the other runs')
  rows, _ = status(root)
  assert [rows[k]['state'] for k in sorted(rows)] == [
      rows[task, 0]['state'], 'done', 'done']
  assert rows[task, 1]['steps'] == rows[task, 2]['steps'] == '600/600'
  assert starts(finished) == 1  # Ran to its end, never stopped.
  # The requeued run resumed in its job, from where it stopped.
  check_resumed(requeued, {'metrics': [], 'episodes': {}})
  before = snapshot(preempted)
  counts = {p: starts(p) for p in (finished, requeued)}

  result = run_sweep(root, *options, timeout=120, **runs)
  assert result.returncode == 0, result.stderr
  assert result.stdout.count(': skipped') == 2, result.stdout
  assert f'submitted {task} seed 0' in result.stdout
  wait_until(lambda: record(preempted).get('state') == 'done',
             'the resumed run')
  rows, _ = status(root)
  assert {r['state'] for r in rows.values()} == {'done'}
  assert {r['steps'] for r in rows.values()} == {'600/600'}
  assert rows[task, 0]['ret'] != '-'
  check_resumed(preempted, before)
  assert {p: starts(p) for p in counts} == counts  # None restarted.

  result = run_sweep(root, *options, timeout=120, **runs)
  assert result.returncode == 0, result.stderr
  assert '3 runs: 3 skipped, submitting 0' in result.stdout


LOCAL = ('--launcher', 'local', '--workers', '2', '--script', STAND_IN)


def test_local_workers_stop_resume_and_report_failures(tmp_path, cleanup):
  """--launcher local --workers 2: two runs fail for their own reasons
  (a logdir that holds another task's run, an unreadable config.json);
  SIGTERM to the sweep stops the others, which save; the same command
  resumes them, reports the failures with their reasons and, run again,
  does not retry them. The runs are tests/stand_in_dreamer.py: dreamer.py's
  own main, flags, checks, lock, signals and loop with a fake agent and
  fake environments; the submitit test above runs the real one."""
  root = tmp_path / 'logdir'
  cleanup(root)
  other_task = logdir(root, 'dmc_cartpole_balance', 1)
  bad_config = logdir(root, 'dmc_pendulum_swingup', 1)
  for path in other_task, bad_config:
    path.mkdir(parents=True)
  (other_task / 'config.json').write_text('{"task": "dmc_walker_walk"}')
  (bad_config / 'config.json').write_text('{"task": ')
  process = subprocess.Popen(
      sweep_command(root, *LOCAL),
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    training = [logdir(root, t, 0) for t in TASKS.split(',')]
    for path in training:
      trainer_pid(path)
    rows, _ = status(root)
    assert rows['dmc_cartpole_balance', 1]['state'].startswith(
        "failed: exit 1: dreamer.py: error: ")
    assert 'holds a run with other settings' in rows[
        'dmc_cartpole_balance', 1]['state']
    assert {rows[k, 0]['state'].split(':')[0] for k in TASKS.split(',')
            } == {'running'}
    before = {path: snapshot(path) for path in training}
    process.send_signal(signal.SIGTERM)  # As Slurm stops an allocation.
    out, err = process.communicate(timeout=120)
  finally:
    process.kill()
  assert process.returncode == 130, out + err
  assert 'Stopping: SIGTERM to 2 run(s)' in out, out
  rows, _ = status(root)
  for task in TASKS.split(','):
    assert rows[task, 0]['state'].startswith('preempted: exit 130'), rows
  assert rows['dmc_pendulum_swingup', 1]['state'] == 'not started'
  for path in training:  # Saved when stopped: nothing was lost since.
    before[path] = snapshot(path)

  result = run_sweep(root, *LOCAL)
  assert result.returncode == 1, result.stdout + result.stderr
  assert ('failed earlier dmc_cartpole_balance seed 1: exit 1: dreamer.py: '
          'error: ') in result.stdout
  assert 'failed dmc_pendulum_swingup seed 1: exit 1: dreamer.py: error: ' \
      in result.stdout and 'is not valid JSON' in result.stdout
  rows, _ = status(root)
  for path in training:
    check_resumed(path, before[path])
  for task in TASKS.split(','):
    assert rows[task, 0]['state'] == 'done'
    assert rows[task, 0]['steps'] == '600/600'
    assert rows[task, 1]['state'].startswith('failed: exit 1: dreamer.py')
  assert status(root)[1].splitlines()[-1] == '4 runs: 2 done, 2 failed.'

  result = run_sweep(root, *LOCAL)
  assert result.returncode == 1
  assert result.stdout.count('failed earlier') == 2, result.stdout
  assert '2 failed run(s) not retried' in result.stdout
  assert '4 runs: 4 skipped, starting 0' in result.stdout
  assert starts(other_task) == starts(bad_config) == 1


# ------------------------------------------------------------- pure Python

@pytest.mark.quick
def test_dmc20_is_the_papers_tasks():
  from dreamer_tf import plot
  paper = {r['task'] for r in plot._paper_records()
           if r['method'] == 'dreamer'}
  assert len(sweep.DMC20) == 20 and set(sweep.DMC20) == paper


@pytest.mark.quick
def test_tasks_and_seeds():
  assert sweep.parse_tasks(['dmc_a_b,dmc_c_d', 'dmc_a_b']) == [
      'dmc_a_b', 'dmc_c_d']
  assert sweep.parse_tasks(['dmc20'])[0] == 'dmc_acrobot_swingup'
  assert sweep.parse_seeds('0-4') == [0, 1, 2, 3, 4]
  assert sweep.parse_seeds('3,1-2,3') == [3, 1, 2]
  for bad in ('4-0', 'x', '-1', '1-', ''):
    with pytest.raises(sweep.SweepError):
      sweep.parse_seeds(bad)
  with pytest.raises(sweep.SweepError, match='nor a list'):
    sweep.parse_tasks(['dmc21'])
  assert sweep.detect_gpus('none') == []
  assert sweep.detect_gpus('2') == ['0', '1']
  assert sweep.detect_gpus('1,3') == ['1', '3']


@pytest.mark.quick
@pytest.mark.parametrize('args, message', [
    (['--tasks', 'nonsense'], "--tasks: 'nonsense' is neither a task"),
    (['--tasks', 'dmc20', '--seeds', '3-1'], '--seeds \'3-1\': the range'),
    (['--tasks', 'dmc20', '--no_such_flag', '1'],
     'dreamer.py would refuse dmc_acrobot_swingup seed 0: unrecognized '
     'arguments: --no_such_flag 1'),
    (['--tasks', 'dmc20', '--seed', '1'], '--seed is set by the sweep'),
    (['--tasks', 'dmc20', '--preset', 'debug', '--steps', '10'],
     '--steps 10 is not above --prefill 500'),
    (['--seeds', '1'], '--tasks is required'),
    (['--tasks', 'dmc20', '--script', 'no_such.py'],
     '--script no_such.py: no such file in '),
])
def test_bad_input_is_one_line_before_anything_starts(tmp_path, capsys,
                                                      args, message):
  root = tmp_path / 'logdir'
  with pytest.raises(SystemExit) as exit:
    sweep.main(['--root', str(root), *args])
  assert str(exit.value).startswith('sweep: error: ')
  assert message in str(exit.value) and '\n' not in str(exit.value)
  assert not root.exists()


@pytest.mark.quick
def test_the_state_of_a_run_comes_from_its_logdir(tmp_path):
  path = tmp_path / 'dmc_x_y' / 'dreamer' / '0'
  assert sweep.run_state(path, 600).state == 'not started'
  path.mkdir(parents=True)
  (path / 'config.json').write_text(json.dumps({'steps': 600}))
  lines = [{'step': 500, 'test/return': 7.5}, {'step': 500, 'loss': 1.0},
           {'step': 550, 'test/return': float('nan')}]
  (path / 'metrics.jsonl').write_text(  # The last line cut by a kill.
      ''.join(json.dumps(r) + '\n' for r in lines) + '{"step": 5')
  state = sweep.run_state(path)
  assert (state.state, state.step, state.steps, state.ret) == (
      'stopped', 550, 600, 7.5)
  assert sweep.read_progress(path / 'metrics.jsonl', chunk=7) == (550, 7.5)
  sweep.write_record(path, state='preempted', reason='exit 130: ...')
  assert sweep.run_state(path).state == 'preempted'
  sweep.write_record(path, state='failed', reason='exit 3: dreamer.py: '
                     'error: non-finite loss')
  state = sweep.run_state(path)
  assert (state.state, state.detail) == (
      'failed', 'exit 3: dreamer.py: error: non-finite loss')
  lock = rundir.Lock(path)  # Held by this process: running.
  lock.acquire()
  try:
    state = sweep.run_state(path)
    assert state.state == 'running'
    assert state.detail.startswith(f'pid {os.getpid()} on ')
  finally:
    lock.release()
  assert sweep.run_state(path).state == 'failed'
  with open(path / 'metrics.jsonl', 'a') as handle:
    handle.write('\n{"step": 600}\n')
  assert sweep.run_state(path).state == 'done'
  assert sweep.run_state(path, steps=1000).state == 'failed'
  rows = sweep.status_table(tmp_path).splitlines()
  assert re.split(r'\s{2,}', rows[0]) == HEADER
  assert re.split(r'\s{2,}', rows[1].strip()) == [
      'dmc_x_y', '0', '600/600', '7.5', rows[1].split()[-3] + ' ago', 'done']
  assert re.fullmatch(r'\d+s', rows[1].split()[-3])
  assert rows[2] == '1 runs: 1 done.'


@pytest.mark.quick
def test_local_workers_get_one_gpu_each_round_robin(tmp_path, monkeypatch):
  """--workers 2 with GPUs 0 and 1: runs at the same time never share a
  GPU (fake runs: `sleep`)."""
  gpus, running = {}, []
  def start(spec, env, job=None, cluster=None):
    gpus[spec] = env['CUDA_VISIBLE_DEVICES']
    assert gpus[spec] not in running
    running.append(gpus[spec])
    return subprocess.Popen(['sleep', '0.2']), 0
  def finish(spec, status, offset, job=None, cluster=None):
    running.remove(gpus[spec])
    return sweep.Outcome('done', 'exit 0', status)
  monkeypatch.setattr(sweep, 'start', start)
  monkeypatch.setattr(sweep, 'finish', finish)
  specs = [sweep.Spec('dmc_x_y', seed, str(tmp_path / str(seed)), (), 10)
           for seed in range(6)]
  outcomes, interrupted = sweep.launch_local(specs, 2, ['0', '1'],
                                             lambda text: None)
  assert [o.kind for o in outcomes] == ['done'] * 6 and not interrupted
  assert sorted(gpus.values()) == ['0'] * 3 + ['1'] * 3


FAKE_SLURM = {
    # Keeps each batch script and answers as sbatch does.
    'sbatch': '#!/bin/sh\nn=$(ls "$FAKE_SLURM"/*.sh 2>/dev/null | wc -l)\n'
              'cp "$1" "$FAKE_SLURM/batch_$n.sh"\n'
              'echo "Submitted batch job $((4242 + n))"\n',
    'srun': '#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do\n'
            '  case "$1" in --unbuffered) shift;; *) shift 2;; esac\ndone\n'
            'exec "$@"\n',
    # The job states are in $FAKE_SLURM/sacct.txt, as sacct prints them.
    'sacct': '#!/bin/sh\necho "JobID|State|NodeList"\n'
             'cat "$FAKE_SLURM/sacct.txt"\n',
    'scontrol': '#!/bin/sh\necho "$@" >> "$FAKE_SLURM/scontrol.log"\n',
}


@pytest.mark.quick
def test_slurm_submission_through_fake_slurm_commands(tmp_path):
  """--launcher slurm through submitit's real SlurmExecutor, with stand-ins
  for sbatch, srun, sacct and scontrol: the batch script asks for what the
  flags say, as one job array; queued runs are shown and, on a rerun,
  skipped while sacct says their job is pending, resubmitted once it is
  gone; a job run from its batch script whose dreamer.py fails on its own
  records the reason, raises and asks for no requeue."""
  fake = tmp_path / 'slurm'
  fake.mkdir()
  for name, text in FAKE_SLURM.items():
    (fake / name).write_text(text)
    (fake / name).chmod(0o755)
  env = dict(os.environ, FAKE_SLURM=str(fake),
             PATH=f'{fake}{os.pathsep}{os.environ["PATH"]}')
  root = tmp_path / 'logdir'
  command = [sys.executable, '-m', 'dreamer_tf.sweep', '--root', str(root),
             '--tasks', 'dmc_cartpole_balance', '--seeds', '0-1',
             '--launcher', 'slurm', '--partition', 'gpu', '--time', '600',
             '--max_running', '1', *FLAGS]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert 'submitted dmc_cartpole_balance seed 0: job 4242_0' in result.stdout
  assert 'submitted dmc_cartpole_balance seed 1: job 4242_1' in result.stdout
  script = (fake / 'batch_0.sh').read_text()
  for line in ('--array=0-1%1', '--partition=gpu', '--time=600',
               '--gpus-per-node=1', '--cpus-per-task=8', '--signal=USR2@90',
               '--job-name=dreamer'):
    assert f'#SBATCH {line}\n' in script, script
  assert '-m submitit.core._submit' in script
  rows, _ = status(root)
  assert rows['dmc_cartpole_balance', 0]['state'] == (
      'queued: Slurm job 4242_0')

  # Seed 0 still pending, seed 1 cancelled before it started; its logdir
  # now holds another task's run, so that its job fails at once.
  (fake / 'sacct.txt').write_text('4242_0|PENDING|\n4242_1|CANCELLED|\n')
  stale = logdir(root, 'dmc_cartpole_balance', 1)
  (stale / 'config.json').write_text('{"task": "dmc_walker_walk"}')
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert ('queued dmc_cartpole_balance seed 0 (Slurm job 4242_0): skipped'
          in result.stdout), result.stdout
  assert 'submitted dmc_cartpole_balance seed 1: job 4243' in result.stdout

  # Slurm starts job 4243: its batch script, with Slurm's variables.
  job = subprocess.run(
      ['sh', fake / 'batch_1.sh'], cwd=ROOT, capture_output=True,
      text=True, timeout=120, env=dict(
          env, SLURM_JOB_ID='4243', SLURM_PROCID='0', SLURM_NTASKS='1',
          SLURM_LOCALID='0', SLURM_NODEID='0', SLURM_JOB_NUM_NODES='1'))
  assert job.returncode == 1, job.stdout + job.stderr
  assert 'holds a run with other settings' in job.stderr
  assert not (fake / 'scontrol.log').exists()  # Not requeued.
  assert record(stale)['state'] == 'failed'
  assert record(stale)['job'] == '4243'
  assert status(root)[0]['dmc_cartpole_balance', 1]['state'].startswith(
      'failed: exit 1: dreamer.py: error: ')


@pytest.mark.quick
def test_a_run_held_elsewhere_is_skipped_and_is_no_failure(tmp_path, capsys):
  root = tmp_path / 'logdir'
  path = logdir(root, 'dmc_cartpole_balance', 0)
  path.mkdir(parents=True)
  lock = rundir.Lock(path)
  lock.acquire()
  try:
    assert sweep.main(['--root', str(root), '--tasks', 'dmc_cartpole_balance',
                       '--dry_run', *FLAGS]) == 0
    out = capsys.readouterr().out
    assert (f'running elsewhere dmc_cartpole_balance seed 0 (pid '
            f'{os.getpid()} on ') in out
    assert '1 runs: 1 skipped, would start 0' in out
  finally:
    lock.release()
  # A start that raced another one: dreamer.py refuses the taken logdir.
  spec = sweep.plan(['dmc_cartpole_balance'], [0], root, list(FLAGS))[0]
  (path / 'sweep.err').write_text(
      'old\ndreamer.py: error: another dreamer.py trains in ... (pid 1 on '
      'h, started t): wait for it or stop it, or use another --logdir.\n')
  outcome = sweep.finish(spec, 1, len('old\n'))
  assert outcome.kind == 'elsewhere' and not (path / 'sweep.json').exists()
  with open(path / 'sweep.err', 'a') as handle:
    offset = handle.tell()
    handle.write('dreamer.py: error: non-finite loss\nWARNING: at exit\n')
  outcome = sweep.finish(spec, 3, offset)
  assert (outcome.kind, outcome.text) == (
      'failed', 'exit 3: dreamer.py: error: non-finite loss')
  assert record(path)['state'] == 'failed'
  assert sweep.finish(spec, 130, offset).kind == 'preempted'
  assert sweep.finish(spec, -9, offset).text.startswith('killed by SIGKILL')
