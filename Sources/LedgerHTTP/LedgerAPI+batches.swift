import Hummingbird
import LedgerCore
import LedgerStore

/// `POST /v1/transfers/batch`: up to 1,000 transfers under one Idempotency-Key, all or nothing or each on its own.
extension LedgerAPI {
    func postBatch(_ call: RouteCall) async throws -> Response {
        let (key, _, keyWait) = try keyedRequest(call, ifMatch: false)
        let batch = try BatchRequest.decode(body: call.body).get()
        return try answer(
            try await store.postBatchAnswer(client: call.client, key: key, batch: batch, keyWait: keyWait),
            trace: call.trace)
    }
}
