import Foundation

/// The OpenAPI 3.1 description of the API, `Resources/openapi.yaml`, shipped as a SwiftPM resource.
enum OpenAPIDocument {
    static let yaml: String? = {
        guard let url = Bundle.module.url(forResource: "openapi", withExtension: "yaml") else { return nil }
        return try? String(contentsOf: url, encoding: .utf8)
    }()
}
