"""What an adapter is meant to learn, and the rank to start from for each (`--task`): plain data,
so that the CLI lists the choices without importing the planner."""

TASK_RANKS = {"style": 8, "format": 8, "domain": 16, "knowledge": 64, "reasoning": 64}
RANK_RULE = "style or format 8, domain adaptation 16, new knowledge or reasoning 64+"
