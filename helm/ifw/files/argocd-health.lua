-- Argo CD health check of an ifw TranscriptionJob (ifw.dev/v1alpha1).
-- Install it in the argocd-cm ConfigMap under the key
--   resource.customizations.health.ifw.dev_TranscriptionJob
-- (see helm/ifw/README.md). Argo CD sets `obj` to the live object and reads the returned `hs`.
--
--   Succeeded                                   -> Healthy     (the transcript is ready)
--   Failed                                      -> Degraded    (reason: message)
--   spec.suspend true, or status.reason Suspended -> Suspended
--   Pending, Queued, Running, or no status yet  -> Progressing (with the job's message and progress)
--   being deleted (the operator's finalizer: cancelled webhook, cleanup) -> Progressing
-- A finished job stays Healthy or Degraded even if spec.suspend is set afterwards.

local hs = {}
local spec = obj.spec or {}
local status = obj.status or {}
local phase = status.phase

-- The operator's message for the current phase, else a default.
local function said(default)
  if type(status.message) == "string" and status.message ~= "" then
    return status.message
  end
  return default
end

if (obj.metadata or {}).deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted: the operator is cancelling the job and cleaning up after it"
elseif phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = said("the transcript is ready")
elseif phase == "Failed" then
  hs.status = "Degraded"
  local message = said("the job failed")
  if type(status.reason) == "string" and status.reason ~= "" then
    message = status.reason .. ": " .. message
  end
  hs.message = message
elseif spec.suspend == true or status.reason == "Suspended" then
  hs.status = "Suspended"
  hs.message = said("spec.suspend is true; set it to false to run the job")
else
  hs.status = "Progressing"
  local message = said("waiting for the operator")
  if phase ~= nil then
    message = phase .. ": " .. message
  end
  local progress = status.progress or {}
  if phase == "Running" and type(progress.percent) == "number" then
    message = message .. string.format(" (%d%%)", math.floor(progress.percent))
  end
  hs.message = message
end
return hs
