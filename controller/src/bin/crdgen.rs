//! `crdgen`: the CustomResourceDefinitions of cloudfs as YAML, printed or written one file
//! each into directories (`manifests/crds/` and the chart's `charts/cloudfs/crds/`, which a
//! test keeps in step with the code).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use cloudfs_controller::crd;

/// Print (or write) the CustomResourceDefinitions of the cloudfs operator.
#[derive(Debug, Parser)]
#[command(name = "crdgen", version, max_term_width = 100)]
struct Args {
    /// Write one `<plural>.yaml` per definition into this directory instead of printing
    /// them all; repeat for more directories.
    #[arg(long, value_name = "DIR")]
    out_dir: Vec<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for (file, definition) in crd::definitions() {
        let yaml = crd::render(&definition)?;
        if args.out_dir.is_empty() {
            print!("---\n{yaml}");
        }
        for dir in &args.out_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let path = dir.join(&file);
            std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
