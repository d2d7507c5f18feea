//! The CSI Identity service: who the plugin is, what it offers, and whether it is ready.

use std::collections::HashMap;

use tonic::{Request, Response, Status};

use crate::DRIVER_NAME;
use crate::proto::identity_server::Identity;
use crate::proto::plugin_capability::{self, service, volume_expansion};
use crate::proto::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// Whether what the plugin serves from (the object store) can be reached now.
#[tonic::async_trait]
pub trait Readiness: Send + Sync + 'static {
    /// `Err` says why not.
    async fn check(&self) -> Result<(), String>;
}

/// The Identity service of a plugin process. Both plugins report the Controller service and
/// online expansion: they are capabilities of the driver as a whole (served by
/// `cloudfs-controller`).
pub struct IdentityService<R> {
    readiness: R,
}

impl<R: Readiness> IdentityService<R> {
    pub fn new(readiness: R) -> IdentityService<R> {
        IdentityService { readiness }
    }
}

#[tonic::async_trait]
impl<R: Readiness> Identity for IdentityService<R> {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: HashMap::new(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let capabilities = vec![
            PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service {
                        r#type: service::Type::ControllerService.into(),
                    },
                )),
            },
            // Expansion raises the volume's quota, which its mounts apply while mounted:
            // no unpublish, no node step.
            PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        r#type: volume_expansion::Type::Online.into(),
                    },
                )),
            },
        ];
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match self.readiness.check().await {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(why, "not ready");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
