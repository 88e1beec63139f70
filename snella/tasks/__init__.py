"""The tasks `snella finetune` trains: one module per task, registered by name (``--task``)."""

from snella.tasks.base import TASKS, StepOutput, Task, TaskData, get_task, register_task, task_names

__all__ = ["TASKS", "StepOutput", "Task", "TaskData", "get_task", "register_task", "task_names"]
