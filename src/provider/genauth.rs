//! (module being written: temporary placeholder so the crate compiles)
use super::{FetchError, OrderRef, PayProvider, ProviderKind};
use crate::model::PayDetail;

pub struct GenAuth;

impl PayProvider for GenAuth {
    fn kind(&self) -> ProviderKind {
        ProviderKind::GenAuth
    }
    async fn prepare(&self) -> Result<(), FetchError> {
        Ok(())
    }
    async fn fetch_detail(&self, _order: &OrderRef) -> Result<PayDetail, FetchError> {
        Err(FetchError::Rejected("not built yet".into()))
    }
}
