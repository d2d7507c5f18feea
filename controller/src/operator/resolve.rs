//! From Kubernetes objects to the engine: the cloudfs volume behind a PVC, the Secret whose
//! credentials reach its pool, and those credentials. Secrets are read afresh on every
//! reconcile, so a rotated Secret applies without a restart.

use std::collections::HashMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Secret};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::{Api, Client};

use super::error::OperatorError;
use crate::crd::SecretReference;
use cloudfs_csi::DRIVER_NAME;
use cloudfs_csi::volume_id::VolumeId;

/// StorageClass parameters naming the Secret the provisioner (and so the operator) uses.
const SECRET_NAME_PARAMETER: &str = "csi.storage.k8s.io/provisioner-secret-name";
const SECRET_NAMESPACE_PARAMETER: &str = "csi.storage.k8s.io/provisioner-secret-namespace";

/// Annotations csi-provisioner puts on a PV it provisioned, naming the provisioner Secret.
const DELETION_SECRET_NAME_ANNOTATION: &str =
    "volume.kubernetes.io/provisioner-deletion-secret-name";
const DELETION_SECRET_NAMESPACE_ANNOTATION: &str =
    "volume.kubernetes.io/provisioner-deletion-secret-namespace";

/// The cloudfs volume behind a PVC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedVolume {
    pub id: VolumeId,
    /// The Secret with the pool's credentials; none: the operator's own environment.
    pub secret: Option<SecretReference>,
}

/// Fills the templates the CSI sidecars allow in secret parameters.
fn expand(template: &str, claim: &PersistentVolumeClaim, pv_name: &str) -> String {
    template
        .replace(
            "${pvc.name}",
            claim.metadata.name.as_deref().unwrap_or_default(),
        )
        .replace(
            "${pvc.namespace}",
            claim.metadata.namespace.as_deref().unwrap_or_default(),
        )
        .replace("${pv.name}", pv_name)
}

/// The volume behind PVC `namespace/name`.
pub async fn claimed_volume(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<ClaimedVolume, OperatorError> {
    let claim_error = |reason: &str| OperatorError::Claim {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason: reason.to_owned(),
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let claim = claims
        .get_opt(name)
        .await?
        .ok_or_else(|| claim_error("not found"))?;
    let pv_name = claim
        .spec
        .as_ref()
        .and_then(|spec| spec.volume_name.clone())
        .ok_or_else(|| claim_error("not bound to a volume yet"))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let volume = volumes
        .get_opt(&pv_name)
        .await?
        .ok_or_else(|| claim_error(&format!("its PersistentVolume {pv_name} is missing")))?;
    let csi = volume
        .spec
        .as_ref()
        .and_then(|spec| spec.csi.as_ref())
        .filter(|csi| csi.driver == DRIVER_NAME)
        .ok_or_else(|| claim_error(&format!("{pv_name} is not a {DRIVER_NAME} volume")))?;
    let id = VolumeId::parse(&csi.volume_handle).ok_or_else(|| {
        claim_error(&format!(
            "{pv_name} has volume handle {:?}, not a cloudfs volume id",
            csi.volume_handle
        ))
    })?;
    // The Secret the PV names, else the one the StorageClass gives the provisioner.
    let secret = match volume_secret(&volume) {
        Some(secret) => Some(secret),
        None => storage_class_secret(client, &claim, &pv_name).await?,
    };
    Ok(ClaimedVolume { id, secret })
}

/// The cloudfs volume of a PV, none for a PV of another driver or with a foreign handle.
pub fn volume_of(volume: &PersistentVolume) -> Option<VolumeId> {
    let csi = volume.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == DRIVER_NAME)
        .then(|| VolumeId::parse(&csi.volume_handle))
        .flatten()
}

/// The Secret a PV itself names: one of its CSI secret references, else the provisioner
/// Secret that csi-provisioner noted on a PV it made (for deleting it later).
pub fn volume_secret(volume: &PersistentVolume) -> Option<SecretReference> {
    let csi = volume.spec.as_ref()?.csi.as_ref()?;
    let referenced = [
        &csi.node_publish_secret_ref,
        &csi.controller_expand_secret_ref,
    ]
    .into_iter()
    .flatten()
    .find_map(|r| {
        Some(SecretReference {
            name: r.name.clone()?,
            namespace: r.namespace.clone()?,
        })
    });
    referenced.or_else(|| {
        let annotations = volume.metadata.annotations.as_ref()?;
        Some(SecretReference {
            name: annotations.get(DELETION_SECRET_NAME_ANNOTATION)?.clone(),
            namespace: annotations
                .get(DELETION_SECRET_NAMESPACE_ANNOTATION)?
                .clone(),
        })
    })
}

async fn storage_class_secret(
    client: &Client,
    claim: &PersistentVolumeClaim,
    pv_name: &str,
) -> Result<Option<SecretReference>, OperatorError> {
    let Some(class_name) = claim
        .spec
        .as_ref()
        .and_then(|spec| spec.storage_class_name.clone())
    else {
        return Ok(None);
    };
    let classes: Api<StorageClass> = Api::all(client.clone());
    let Some(class) = classes.get_opt(&class_name).await? else {
        return Ok(None);
    };
    Ok(class_secret(&class, Some((claim, pv_name))))
}

/// The provisioner Secret a StorageClass names, with its templates filled for a claim.
pub fn class_secret(
    class: &StorageClass,
    claim: Option<(&PersistentVolumeClaim, &str)>,
) -> Option<SecretReference> {
    let parameters = class.parameters.as_ref()?;
    let fill = |template: &String| match claim {
        Some((claim, pv_name)) => expand(template, claim, pv_name),
        None => template.clone(),
    };
    Some(SecretReference {
        name: fill(parameters.get(SECRET_NAME_PARAMETER)?),
        namespace: fill(parameters.get(SECRET_NAMESPACE_PARAMETER)?),
    })
}

/// The keys of the Secret `secret` names (none: no keys, so the operator's environment
/// applies).
pub async fn credentials(
    client: &Client,
    secret: Option<&SecretReference>,
) -> Result<HashMap<String, String>, OperatorError> {
    let Some(reference) = secret else {
        return Ok(HashMap::new());
    };
    let secret_error = |reason: String| OperatorError::Secret {
        namespace: reference.namespace.clone(),
        name: reference.name.clone(),
        reason,
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &reference.namespace);
    let secret = secrets
        .get_opt(&reference.name)
        .await?
        .ok_or_else(|| secret_error("not found".into()))?;
    let mut keys = HashMap::new();
    for (key, value) in secret.data.unwrap_or_default() {
        let text = String::from_utf8(value.0)
            .map_err(|_| secret_error(format!("key {key} is not UTF-8 text")))?;
        keys.insert(key, text);
    }
    keys.extend(secret.string_data.unwrap_or_default());
    if keys.is_empty() {
        return Err(secret_error("holds no keys".into()));
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    #[test]
    fn class_secrets_fill_their_templates() {
        let class = StorageClass {
            parameters: Some(
                [
                    (SECRET_NAME_PARAMETER, "swift-${pvc.name}"),
                    (SECRET_NAMESPACE_PARAMETER, "${pvc.namespace}"),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            ..StorageClass::default()
        };
        let claim = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                namespace: Some("apps".into()),
                ..ObjectMeta::default()
            },
            ..PersistentVolumeClaim::default()
        };
        assert_eq!(
            class_secret(&class, Some((&claim, "pv-1"))),
            Some(SecretReference {
                name: "swift-data".into(),
                namespace: "apps".into()
            })
        );
        assert_eq!(class_secret(&StorageClass::default(), None), None);
    }
}
