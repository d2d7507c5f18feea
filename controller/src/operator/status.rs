//! Conditions as the Kubernetes API conventions want them, and the events every change of
//! state is announced with.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::error::OperatorError;

/// Now, as the API stores times.
pub fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

/// Condition `type_` set to `ok`, keeping the transition time of `previous` when its status
/// does not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
) -> Vec<Condition> {
    let status = if ok { "True" } else { "False" };
    let unchanged = previous
        .iter()
        .find(|c| c.type_ == type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone());
    let mut conditions: Vec<Condition> = previous
        .iter()
        .filter(|c| c.type_ != type_)
        .cloned()
        .collect();
    conditions.push(Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: unchanged.unwrap_or_else(now),
    });
    conditions
}

/// Replaces the status of `object` with `status` (fields it leaves out keep their values).
pub async fn patch_status<K>(
    api: &Api<K>,
    object: &K,
    status: &impl Serialize,
) -> Result<(), kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.patch_status(
        &object.name_any(),
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await?;
    Ok(())
}

/// Condition `type_` false for the reason `error` gives.
pub fn failed_condition(
    previous: &[Condition],
    type_: &str,
    error: &OperatorError,
    generation: Option<i64>,
) -> Vec<Condition> {
    condition(
        previous,
        type_,
        false,
        error.reason(),
        error.to_string(),
        generation,
    )
}

/// The end of a failed reconcile, once its status says why: announces `error`, then waits for
/// a change of the resource if the failure is permanent, or hands it back to the controller
/// for a retry with backoff.
pub async fn give_up_or_retry<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    object: &K,
    action: &str,
    error: OperatorError,
) -> Result<Action, OperatorError> {
    announce(
        recorder,
        object,
        true,
        error.reason(),
        action,
        error.to_string(),
    )
    .await;
    if error.is_permanent() {
        Ok(Action::await_change())
    } else {
        Err(error)
    }
}

/// Publishes an event on `object`; a failure to publish is logged, never fatal.
pub async fn announce<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    object: &K,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, &object.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "could not publish an event");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_keeps_its_transition_time_while_its_status_holds() {
        let first = condition(&[], "Ready", false, "Waiting", "not yet", Some(1));
        let again = condition(&first, "Ready", false, "Waiting", "still not", Some(2));
        assert_eq!(first[0].last_transition_time, again[0].last_transition_time);
        assert_eq!(again[0].observed_generation, Some(2));
        let flipped = condition(&again, "Ready", true, "Created", "done", Some(2));
        assert_eq!(flipped.len(), 1);
        assert_eq!(flipped[0].status, "True");
    }
}
