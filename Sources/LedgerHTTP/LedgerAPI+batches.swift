import Hummingbird
import LedgerCore
import LedgerStore

/// `POST /v1/transfers/batch`: up to 1,000 transfers under one Idempotency-Key, all or nothing or each on its own.
extension LedgerAPI {
    func postBatch(_ call: RouteCall) async throws -> Response {
        let key = try idempotencyKey(call.request)
        let batch = try BatchRequest.decode(body: call.body).get()
        return try answer(try await store.postBatch(client: call.client, key: key, batch: batch), trace: call.trace)
    }
}
