//! cloudfs's control plane: the CSI Controller service's engine [`backend`], and the operator
//! that reconciles the cloudfs custom resources ([`crd`]) against the same engine.

pub mod backend;
pub mod crd;
pub mod operator;

pub use backend::EngineBackend;
