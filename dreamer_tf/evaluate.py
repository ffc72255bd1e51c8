"""Evaluation episodes of the policy, and --mode eval: the saved policy of a
run, played and reported without training."""

import json
import pathlib

import numpy as np

import wrappers
from dreamer_tf import progress
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
  writes <logdir>/eval/returns.json and eval/episode_0.mp4."""
  import tools
  from dreamer_tf import agent as agent_lib
  logdir = pathlib.Path(config.logdir).expanduser()
  env = wrappers.make_envs(config, train=False)
  try:
    agent = agent_lib.Dreamer(config, env.action_space.shape[0])
    checkpoint = Checkpointer(agent, logdir)
    checkpoint.restore()
    episodes = run_episodes(
        agent_lib.Policy(agent), env, config.eval_episodes, config)
  finally:
    env.close()
  returns = [float(e['reward'].sum()) for e in episodes]
  result = dict(step=checkpoint.step, returns=returns,
                mean=float(np.mean(returns)), std=float(np.std(returns)))
  outdir = logdir / 'eval'
  outdir.mkdir(exist_ok=True)
  (outdir / 'returns.json').write_text(json.dumps(result, indent=2) + '\n')
  video = tools.write_video(outdir / 'episode_0.mp4', episodes[0]['image'])
  print(f'{config.task} at step {result["step"]}: return {result["mean"]:.1f}'
        f' +- {result["std"]:.1f} over {len(returns)} episodes '
        f'(min {min(returns):.1f}, max {max(returns):.1f}).')
  print(f'Wrote {outdir / "returns.json"} and {video}.')
  return result
