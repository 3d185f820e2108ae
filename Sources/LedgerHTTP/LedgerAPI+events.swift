import Foundation
import Hummingbird
import LedgerCore
import LedgerStore

/// The event feed: `GET /v1/events`, and webhooks: `PUT`, `GET`, `DELETE /v1/webhooks/{id}`, `GET /v1/webhooks`.
extension LedgerAPI {
    /// One page after `after`; with `wait_s`, an empty page waits for the client's next commit (or the deadline).
    func getEvents(_ call: RouteCall) async throws -> Response {
        let parameters = call.request.uri.queryParameters
        let query = try EventsQuery.parse(
            after: parameters["after"].map(String.init), limit: parameters["limit"].map(String.init),
            waitSeconds: parameters["wait_s"].map(String.init)
        ).get()
        let deadline = ContinuousClock.now + .seconds(query.waitSeconds)
        while true {
            guard let page = try await store.eventsPage(client: call.client, after: query.after, limit: query.limit) else {
                throw Problem.invalidEventCursor
            }
            let remaining = deadline - .now
            if page.eventsJSON != "[]" || remaining <= .zero { return Self.eventsAnswer(page) }
            guard let wake = await events.wait(client: call.client, mark: page.mark, timeout: remaining) else {
                throw Problem.eventWaitersExhausted(retryAfterSeconds: options.retryAfterSeconds)
            }
            if wake != .event { return Self.eventsAnswer(page) }
        }
    }

    static func eventsAnswer(_ page: LedgerStore.EventsPage) -> Response {
        let next = page.nextAfter.map { "\"\($0)\"" } ?? "null"
        return .json(status: 200, body: "{\"events\":\(page.eventsJSON),\"next_after\":\(next)}")
    }

    /// 201 with the secret when new, 200 when it existed (url, types and enabled replaced; the secret stays).
    func putWebhook(_ call: RouteCall) async throws -> Response {
        let id = try webhookID(call)
        try checkContentType(call.request)
        let request = try WebhookRequest.decode(body: call.body, hostsAllowed: options.webhookHostsAllowed).get()
        switch try await store.putWebhook(client: call.client, id: id, request: request) {
        case .created(let body): return .json(status: 201, body: body)
        case .replaced(let body): return .json(status: 200, body: body)
        }
    }

    func getWebhook(_ call: RouteCall) async throws -> Response {
        let id = try webhookID(call)
        guard let body = try await store.webhook(client: call.client, id: id) else { throw Problem.webhookNotFound(id) }
        return .json(status: 200, body: body)
    }

    func listWebhooks(_ call: RouteCall) async throws -> Response {
        .json(status: 200, body: try await store.webhooks(client: call.client))
    }

    func deleteWebhook(_ call: RouteCall) async throws -> Response {
        let id = try webhookID(call)
        guard try await store.deleteWebhook(client: call.client, id: id) else { throw Problem.webhookNotFound(id) }
        return Response(status: .noContent)
    }

    /// The id in the path, percent-decoded: the account id pattern.
    private func webhookID(_ call: RouteCall) throws -> String {
        guard let id = call.parameter("id").removingPercentEncoding, LedgerRules.isValidAccountID(id) else {
            throw Problem.invalidWebhookID("The webhook id in the path must match [A-Za-z0-9][A-Za-z0-9._:-]{0,63}.")
        }
        return id
    }
}
