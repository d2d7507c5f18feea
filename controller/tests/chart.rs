//! The Helm chart against the real API server: `tests/helm/check.sh` renders the chart with
//! several value sets, installs the CRDs, and runs this with KUBECONFIG and
//! CLOUDFS_CHART_RENDERED (the rendered files, `:`-separated). Every object must pass a
//! server-side dry-run apply, so a schema error anywhere in the chart fails here.

use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use kube::discovery::{Discovery, Scope};
use kube::{Client, ResourceExt};
use serde::Deserialize;

fn env(key: &str) -> String {
    std::env::var(key)
        .unwrap_or_else(|_| panic!("{key} is not set: run these tests with tests/helm/check.sh"))
}

/// The objects of a multi-document YAML file (empty documents left out).
fn objects(path: &str) -> Vec<DynamicObject> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::Deserializer::from_str(&text)
        .map(|document| serde_json::Value::deserialize(document).expect("a YAML document"))
        .filter(|value| !value.is_null())
        .map(|value| serde_json::from_value(value).expect("a Kubernetes object"))
        .collect()
}

#[tokio::test]
async fn chart_e2e_rendered_objects_pass_a_server_side_dry_run() {
    env("KUBECONFIG");
    let files = env("CLOUDFS_CHART_RENDERED");
    let client = Client::try_default()
        .await
        .expect("a client from KUBECONFIG");
    let discovery = Discovery::new(client.clone())
        .run()
        .await
        .expect("API discovery");
    let dry_run = PatchParams::apply("cloudfs-chart-check").dry_run().force();
    let mut checked = 0;
    let mut failures = Vec::new();
    for path in files.split(':') {
        for object in objects(path) {
            let types = object.types.clone().expect("apiVersion and kind");
            let (group, version) = types
                .api_version
                .split_once('/')
                .unwrap_or(("", &types.api_version));
            let gvk = GroupVersionKind::gvk(group, version, &types.kind);
            let name = object.name_any();
            let Some((resource, capabilities)) = discovery.resolve_gvk(&gvk) else {
                failures.push(format!("{path}: {} {name}: unknown kind", types.kind));
                continue;
            };
            let api: Api<DynamicObject> = match capabilities.scope {
                Scope::Namespaced => {
                    let namespace = object.namespace().expect("a namespaced object's namespace");
                    ensure_namespace(&client, &namespace).await;
                    Api::namespaced_with(client.clone(), &namespace, &resource)
                }
                Scope::Cluster => Api::all_with(client.clone(), &resource),
            };
            if let Err(e) = api.patch(&name, &dry_run, &Patch::Apply(&object)).await {
                failures.push(format!("{path}: {} {name}: {e}", types.kind));
            }
            checked += 1;
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(checked > 10, "only {checked} objects checked");
}

/// A namespace the chart installs into exists for real (a dry run cannot create objects in a
/// namespace that does not).
async fn ensure_namespace(client: &Client, name: &str) {
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    if namespaces
        .get_opt(name)
        .await
        .expect("get namespace")
        .is_none()
    {
        let namespace = serde_json::from_value(serde_json::json!({
            "metadata": { "name": name }
        }))
        .expect("a namespace");
        let _ = namespaces.create(&PostParams::default(), &namespace).await;
    }
}
