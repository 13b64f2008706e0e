//! One delivery, step by step: the host-side work repository, hutch-repo's checks, the branch, the push, the
//! pull request and the comment.

use crate::{Delivered, DeliveryPlan, ForgeError, ForgeRepo, RetryPolicy, SecretToken};

pub(crate) async fn deliver(_repo: &ForgeRepo, _token: &SecretToken, _plan: &DeliveryPlan, _retry: RetryPolicy) -> Result<Delivered, ForgeError> {
    Err(ForgeError::Config("delivery is not built yet".into()))
}
