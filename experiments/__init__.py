"""The research program around rssbl_jax: tasks, baselines and the commands that run them."""
