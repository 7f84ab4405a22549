-- Argo CD health check for spanvm.io/SpanningVM. Install it under
-- resource.customizations.health.spanvm.io_SpanningVM in argocd-cm (see docs/gitops.md).
local hs = {}
if obj.status == nil or obj.status.phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the spanvm operator"
  return hs
end
local generation = obj.metadata.generation
if generation ~= nil and obj.status.observedGeneration ~= nil
    and obj.status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "the operator has not acted on generation " .. generation .. " yet"
  return hs
end
local phase = obj.status.phase
local message = obj.status.message or phase
if phase == "Running" or phase == "Succeeded" then
  hs.status = "Healthy"
elseif phase == "Degraded" or phase == "Failed" then
  hs.status = "Degraded"
elseif phase == "Stopped" then
  hs.status = "Suspended"
else
  hs.status = "Progressing"  -- Pending, Scheduling, Starting, Terminating
end
hs.message = phase .. ": " .. message
return hs
