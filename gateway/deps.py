"""FastAPI dependencies: what a route needs from the app and the request, declared in its signature."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from ifw.gateway.errors import TaskNotFound
from ifw.gateway.service import Service
from ifw.gateway.taskids import is_task_id


def _service(request: Request) -> Service:
    return request.app.state.service  # made by the app's lifespan


def _namespace(request: Request) -> str:
    return request.state.namespace  # set by the auth middleware: the one the presented key opens


def _task_id(
    task_id: Annotated[
        str,
        Path(description="The task's id (managed_task_id, URL-encoded: crm%3Acall%2F8812, or the uuid4 it was given)."),
    ],
) -> str:
    # The route's {task_id:path} takes the decoded id, slashes included; an id that no
    # request could have given names no task.
    if not is_task_id(task_id):
        raise TaskNotFound()
    return task_id


ServiceDep = Annotated[Service, Depends(_service)]
Namespace = Annotated[str, Depends(_namespace)]
TaskId = Annotated[str, Depends(_task_id)]
