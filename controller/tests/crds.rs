//! `manifests/crds/` and the chart's `crds/` hold exactly what `crdgen` generates from the
//! resource types, so the chart and `kubectl apply` install the definitions the operator reads
//! and writes.

use std::path::Path;

use cloudfs_controller::crd;

#[test]
fn manifests_and_the_chart_match_the_resource_types() {
    for place in ["manifests/crds", "charts/cloudfs/crds"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(place);
        let mut stale = Vec::new();
        for (file, definition) in crd::definitions() {
            let want = crd::render(&definition).expect("render");
            let have = std::fs::read_to_string(dir.join(&file)).unwrap_or_default();
            if have != want {
                stale.push(file);
            }
        }
        assert!(
            stale.is_empty(),
            "{place}/{stale:?} differ from the code: run `cargo run -p cloudfs-controller \
             --bin crdgen -- --out-dir manifests/crds --out-dir charts/cloudfs/crds`"
        );
        let files = std::fs::read_dir(&dir).expect(place).count();
        assert_eq!(files, crd::definitions().len(), "no stray files in {place}");
    }
}

#[test]
fn every_resource_has_a_status_subresource_printer_columns_and_a_short_name() {
    for (file, definition) in crd::definitions() {
        let version = &definition.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{file}"
        );
        assert!(version.additional_printer_columns.is_some(), "{file}");
        assert!(definition.spec.names.short_names.is_some(), "{file}");
        assert_eq!(definition.spec.group, crd::GROUP);
    }
}
