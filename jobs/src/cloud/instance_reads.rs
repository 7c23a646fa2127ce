//! Reads of single instances, gathered into one `DescribeInstances` per batch.
//!
//! Every waiting step reads its node's instance, and thousands of nodes may wait at once (a
//! region slow to start instances). One call per read would spend the region's EC2 budget on
//! polling and starve the launches of new nodes. Here one task per region sends the reads:
//! while its call is out, the reads that arrive queue up and go together in the next one, so
//! a lone read is sent at once and a crowd of reads costs one call per batch.

use std::collections::HashMap;
use std::future::Future;

use tokio::sync::{mpsc, oneshot};

use super::{CloudError, CloudResult};

/// The most instance ids one call filters on (EC2 takes at most 200 values per filter).
pub const MOST_PER_CALL: usize = 200;

/// One read waiting for its batch: the instance id, and where its answer (`T`, what the
/// client makes of an instance) goes.
pub struct Read<T> {
    instance_id: String,
    answer: oneshot::Sender<CloudResult<Option<T>>>,
}

/// The queue of one region's reads.
pub type Reads<T> = mpsc::UnboundedSender<Read<T>>;

/// Starts the task that sends batched reads through `describe_many` (the live instances among
/// the ids, by id); it ends when the last sender is gone.
pub fn spawn<T, F, Fut>(describe_many: F) -> Reads<T>
where
    T: Clone + Send + 'static,
    F: Fn(Vec<String>) -> Fut + Send + 'static,
    Fut: Future<Output = CloudResult<HashMap<String, T>>> + Send,
{
    let (sender, mut queue) = mpsc::unbounded_channel::<Read<T>>();
    tokio::spawn(async move {
        while let Some(first) = queue.recv().await {
            let mut batch = vec![first];
            while batch.len() < MOST_PER_CALL {
                match queue.try_recv() {
                    Ok(read) => batch.push(read),
                    Err(_) => break,
                }
            }
            let mut ids: Vec<String> = batch.iter().map(|r| r.instance_id.clone()).collect();
            ids.sort_unstable();
            ids.dedup();
            let instances = ids.len();
            let found = describe_many(ids).await;
            tracing::debug!(reads = batch.len(), instances, "instances read together");
            for read in batch {
                let answer = match &found {
                    Ok(found) => Ok(found.get(&read.instance_id).cloned()),
                    Err(e) => Err(e.clone()),
                };
                // The reader may have gone (its job was cancelled); nobody is left to tell.
                let _gone = read.answer.send(answer);
            }
        }
    });
    sender
}

/// Queues a read of `instance_id` and waits for its batch's answer.
pub async fn read<T>(reads: &Reads<T>, instance_id: &str) -> CloudResult<Option<T>> {
    let (answer, answered) = oneshot::channel();
    let lost = || CloudError::transient("ec2:DescribeInstances", "the batched read was lost");
    reads
        .send(Read {
            instance_id: instance_id.to_string(),
            answer,
        })
        .map_err(|_| lost())?;
    answered.await.map_err(|_| lost())?
}
