"""Evaluation episodes of the policy, and --mode eval: the saved policy of a
run, played and reported without training."""

import json
import pathlib
import sys

import numpy as np

import wrappers
from dreamer_tf import progress, rundir
from dreamer_tf.checkpoint import Checkpointer
from dreamer_tf.faults import finite_actions


def run_episodes(policy, env, count, config):
  """`count` evaluation episodes: the policy's mode, exploration only at
  `eval_noise`. Returns the episodes (dicts of arrays, all frames)."""
  import tools
  episodes = []
  bar = progress.bar(None, 'eval', 'episode', total=count)
  def act(images, reset, state):
    actions, state = policy(images, reset, state, False, config.eval_noise)
    return finite_actions(actions), state
  def on_episode(index, episode):
    episodes.append(episode)
    bar.update(1)
  tools.simulate(act, env, episodes=count, on_episode=on_episode)
  bar.close()
  return episodes


def evaluate_checkpoint(config):
  """--mode eval: N episodes of the saved policy; prints mean and std and
  writes <logdir>/eval/returns.json and eval/episode_0.mp4. Writes nothing
  into checkpoints/. Returns the exit status: 1 when returns.json cannot be
  written (the result is still printed), so that a script never takes an
  older returns.json for this result; else 0."""
  from dreamer_tf import agent as agent_lib
  logdir = pathlib.Path(config.logdir).expanduser()
  env = wrappers.make_envs(config, train=False)
  try:
    agent = agent_lib.Dreamer(config, env.action_space.shape[0])
    checkpoint = Checkpointer(agent, logdir, owner=False)
    if not checkpoint.restore():  # Never the score of an untrained agent.
      raise ValueError(f'no checkpoint in {logdir / "checkpoints"}: train '
                       'first (a checkpoint is saved after each evaluation).')
    episodes = run_episodes(
        agent_lib.Policy(agent), env, config.eval_episodes, config)
  finally:
    env.close()
  returns = [float(e['reward'].sum()) for e in episodes]
  result = dict(step=checkpoint.step, returns=returns,
                mean=float(np.mean(returns)), std=float(np.std(returns)))
  return 0 if report(config.task, result, episodes, logdir / 'eval') else 1


def report(task, result, episodes, outdir):
  """Prints the result line, then writes `outdir`/returns.json and the video
  of the first episode. A write that fails is one warning line on stderr
  naming the path and the reason (the video is then left out). True when
  returns.json was written."""
  import tools
  returns = result['returns']
  print(f'{task} at step {result["step"]}: return {result["mean"]:.1f}'
        f' +- {result["std"]:.1f} over {len(returns)} episodes '
        f'(min {min(returns):.1f}, max {max(returns):.1f}).', flush=True)
  outdir = pathlib.Path(outdir)
  path = outdir / 'returns.json'
  try:
    outdir.mkdir(exist_ok=True)
    rundir.write_atomic(path, json.dumps(result, indent=2) + '\n')
  except OSError as error:
    _cannot_write(path, error, outdir, 'the result above is not saved')
    return False
  video = outdir / 'episode_0.mp4'
  try:
    video = tools.write_video(video, episodes[0]['image'])
  except Exception as error:  # imageio raises more than OSError.
    _cannot_write(video, error, outdir, 'no video')
    print(f'Wrote {path}.')
    return True
  print(f'Wrote {path} and {video}.')
  return True


def _cannot_write(path, error, outdir, consequence):
  if outdir.exists() and not outdir.is_dir():
    reason = f'{outdir} is a file, not a folder'
  elif isinstance(error, OSError) and error.strerror:
    reason = error.strerror
  else:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
  print(f'dreamer.py: warning: cannot write {path}: {reason} ({consequence})',
        file=sys.stderr, flush=True)
