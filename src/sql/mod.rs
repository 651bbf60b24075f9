//! DataFusion table functions `enrich(task, source)` and `task_group_runs(id)`.
